"""Tally metering benchmark: recording throughput, usage statistics over a large account,
and report exports, on one machine.

    python -m bench.metering [--seconds N] [--processes P] [--concurrency C]
                             [--events N] [--export-rows N] [--skip-load]
                             [--database-url URL] [--time-limit S]

Starts PostgreSQL (the embedded pgserver in a temporary directory, or the server at
``--database-url``) with a fresh, migrated database and ``tally_service serve`` as a
subprocess on a free loopback port, then:

1. Throughput. With the multi-process load generator (``bench.metering_load``):
   Health/Check on the server (its no-op ceiling); RecordUsage, one event per call,
   ``--concurrency`` coroutines per process over ``--accounts`` accounts, for
   ``--seconds``; RecordUsageBatch with 100 events per call (on one account, and over 100
   accounts) and 1,000 events per call, and StreamUsage with ``--stream-events`` events
   per call, ``--batch-concurrency`` coroutines per process for ``--batch-seconds``; and
   the 1,000-event batches again at ``--overload-concurrency``. Each recording scenario
   runs right after the same load against a no-op MeteringService on the same gRPC stack
   (``bench.metering_noop``): its ceiling. Commits are durable: the server's sessions
   keep PostgreSQL's default ``synchronous_commit = on``. Every event is priced (0.001
   credits) and charged. With a superuser, ``track_functions = 'pl'`` gives PostgreSQL's
   time per event in each PL/pgSQL function of each recording run.
2. One account with ``--events`` usage events over the last 365 days, loaded with COPY
   straight into ``usage_events``, and its 15-minute rollups built with one
   ``INSERT ... SELECT ... GROUP BY`` (``bench.metering_data``); VACUUM (ANALYZE).
3. GetUsage latency on that account (sequential calls): 30 and 365 days, daily and
   monthly, a range not aligned to 15 minutes, with and without a product filter; the
   totals checked against ``count(*)`` over ``usage_events``; the plan of the
   statistics query (EXPLAIN ANALYZE) for the largest cases.
4. ExportUsageReport, XLSX then CSV, over a range of ``--export-rows`` events of that
   account, each on a freshly started server process: wall time, MB/s, rows/s, and the
   server's peak RSS growth (VmHWM before and after); the files are checked.

Prints markdown tables. Every phase, loop and child process is bounded, and the whole
run has a hard time limit. The exit status is non-zero when a check failed.
"""

import argparse
import asyncio
import io
import math
import os
import platform
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self
from zoneinfo import ZoneInfo

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from bench import metering_data, metering_load
from bench.postgres import ServerFacts, admin_url, analyze, fresh_database, server_facts
from bench.probe import WindowProbe, find_postmaster, plain_url
from bench.run import TimeLimitExceeded, fmt, fmt_ms, hard_time_limit, log_problems
from bench.server import HOST, ROOT, ServerProcess, free_port, start_server, wait_serving
from tally.v1 import metering_pb2
from tally_client import TallyClient, usage_event

DESCRIPTION = "Tally metering benchmark: recording throughput, GetUsage and export."
CALL_PRODUCT = "bench-call"
WARM_UP_EVENTS = 10  # per account, before the ANALYZE of the set-up
CALL_PRICE = "0.001"
ACCOUNT_TOP_UP = "1000000"  # a billion events at 0.001
BIG_ACCOUNT = "meter-big"
BIG_TIME_ZONE = "Asia/Kolkata"
FILTER_PRODUCT = "PAN-Plus"
SETUP_THREADS = 16
VERIFY_SAMPLE = 10
CLIENT_TIMEOUT_SECONDS = 30.0
USAGE_TIMEOUT_SECONDS = 60.0
EXPORT_TIMEOUT_SECONDS = 900.0
RSS_SAMPLE_SECONDS = 0.1
PLAN_LINES = 60
MAX_RECEIVE_BYTES = 16 * 1024 * 1024
# Idle backends publish their statistics at most 10 s after their last transaction
# (PGSTAT_IDLE_INTERVAL); a margin on top.
STATS_PUBLISH_SECONDS = 12.0
PROFILE_COLUMNS = 6


def log(message: str) -> None:
    print(f"bench: {message}", flush=True)


# -- arguments --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.metering", description=DESCRIPTION)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds per run")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="coroutines per process, unary calls"
    )
    parser.add_argument(
        "--batch-concurrency",
        type=int,
        default=1,
        help="coroutines per process for batches and streams (default 1)",
    )
    parser.add_argument(
        "--overload-concurrency",
        type=int,
        default=4,
        help="coroutines per process of one more 1,000-event batch run (0: none)",
    )
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=20.0,
        help="measured seconds of batch and stream runs (their calls are few and long)",
    )
    parser.add_argument(
        "--stream-events", type=int, default=1000, help="events per StreamUsage call"
    )
    parser.add_argument(
        "--stream-per-message",
        type=int,
        default=100,
        help="events per StreamUsage message (1: one message per event, the `event` field)",
    )
    parser.add_argument("--accounts", type=int, default=1000, help="accounts for throughput")
    parser.add_argument(
        "--events", type=int, default=10_000_000, help="usage events of the large account"
    )
    parser.add_argument(
        "--export-rows", type=int, default=1_000_000, help="rows of the exported range"
    )
    parser.add_argument("--usage-calls", type=int, default=20, help="timed GetUsage calls per case")
    parser.add_argument(
        "--skip-load",
        action="store_true",
        help="throughput only: no large account, GetUsage or export",
    )
    parser.add_argument("--skip-throughput", action="store_true", help="no throughput runs")
    parser.add_argument(
        "--fresh-plans",
        action="store_true",
        help="no usage warm-up and ANALYZE after the set-up: the server's plans stay those "
        "made on empty tables (the figures before 2026-12-01)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="throughput scenarios to run, comma-separated keys (unary, batch100, "
        "batch100-mixed, batch1000, stream, batch1000-cN); each runs with its no-op twin "
        "(default: all)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="PostgreSQL server to create the benchmark database on (default: embedded)",
    )
    parser.add_argument("--pool-size", type=int, default=20, help="TALLY_DB_POOL_SIZE")
    parser.add_argument(
        "--rpc-timeout", type=float, default=30.0, help="deadline of every load RPC"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="hard limit on the whole run in seconds (default: derived from the plan)",
    )
    parser.add_argument("--server-log", default="", help="copy the server logs here at the end")
    parser.add_argument(
        "--keep-database", action="store_true", help="do not drop the benchmark database"
    )
    args = parser.parse_args(argv)
    positive = (
        args.seconds,
        args.processes,
        args.concurrency,
        args.batch_concurrency,
        args.batch_seconds,
        args.stream_events,
        args.stream_per_message,
        args.accounts,
        args.events,
        args.usage_calls,
    )
    if any(v <= 0 for v in positive) or args.warmup < 0 or args.overload_concurrency < 0:
        parser.error("counts and durations must be positive")
    if not 0 < args.export_rows <= args.events:
        parser.error("--export-rows must be between 1 and --events")
    return args


# -- throughput ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    kind: str
    concurrency: int
    seconds: float
    events_per_call: int = 1
    accounts_per_call: int = 1
    noop: bool = False  # against the no-op MeteringService
    twin: str = ""  # the no-op scenario this one is compared with


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """Health/Check, then each recording scenario right after its no-op twin (which also
    leaves PostgreSQL idle long enough to publish the statistics of the run before)."""
    n = args.stream_events
    c, bc, oc = args.concurrency, args.batch_concurrency, args.overload_concurrency
    short, long = args.seconds, args.batch_seconds
    recording = [
        ("unary", "RecordUsage, 1 event/call", "unary", c, short, 1, 1),
        (
            "batch100",
            "RecordUsageBatch, 100 events/call, 1 account/call",
            "batch",
            bc,
            long,
            100,
            1,
        ),
        (
            "batch100-mixed",
            "RecordUsageBatch, 100 events/call over 100 accounts",
            "batch",
            bc,
            long,
            100,
            100,
        ),
        (
            "batch1000",
            "RecordUsageBatch, 1,000 events/call, 1 account/call",
            "batch",
            bc,
            long,
            1000,
            1,
        ),
        (
            "stream",
            f"StreamUsage, {n:,} events/call ({args.stream_per_message}/message), 1 account/call",
            "stream",
            bc,
            long,
            n,
            1,
        ),
    ]
    if oc:
        recording.append(
            (
                f"batch1000-c{oc}",
                f"RecordUsageBatch, 1,000 events/call, 1 account/call, {oc} per process",
                "batch",
                oc,
                long,
                1000,
                1,
            )
        )
    out = [
        Scenario("health", "Health/Check (server's no-op ceiling, no database)", "health", c, short)
    ]
    only = {k.strip() for k in args.only.split(",") if k.strip()}
    for key, label, kind, conc, seconds, size, per_call in recording:
        if only and key not in only:
            continue
        twin = f"{key}-noop"
        out.append(Scenario(twin, f"{label} [no-op]", kind, conc, seconds, size, per_call, True))
        out.append(Scenario(key, label, kind, conc, seconds, size, per_call, twin=twin))
    return out


def account_ids(n: int) -> list[str]:
    return [f"meter-{i:05d}" for i in range(n)]


def set_up(url: str, target: str, accounts: list[str], with_big: bool, fresh_plans: bool) -> None:
    """Products and funded accounts; then, unless ``fresh_plans``, a few events of every
    account and an ANALYZE (``bench.postgres.analyze``), so the runs measure the plans of
    a database with statistics, as autovacuum keeps a live one."""
    with TallyClient(target, timeout_seconds=CLIENT_TIMEOUT_SECONDS) as client:
        client.upsert_product(CALL_PRODUCT, CALL_PRICE)
        for product in metering_data.PRODUCTS:
            client.upsert_product(product, "0.5")

        def fund(account: str) -> None:
            client.create_account(account)
            client.top_up(account, ACCOUNT_TOP_UP, reference="bench")

        def warm(account: str) -> None:
            client.record_usage_batch(
                usage_event(account, f"warm-up.{account}.{i}", CALL_PRODUCT, status_code=200)
                for i in range(WARM_UP_EVENTS)
            )

        with ThreadPoolExecutor(SETUP_THREADS) as pool:
            list(pool.map(fund, accounts, timeout=600))
            if not fresh_plans:
                list(pool.map(warm, accounts, timeout=600))
        if with_big:
            client.create_account(BIG_ACCOUNT, time_zone=BIG_TIME_ZONE)
    if not fresh_plans:
        log(f"ANALYZE {', '.join(analyze(url))}")


def start_noop(log_path: Path) -> ServerProcess:
    """``python -m bench.metering_noop`` on a free loopback port, SERVING."""
    target = f"{HOST}:{free_port()}"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.metering_noop", "--listen", target],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    server = ServerProcess(target, process, log_path, 2.0)
    try:
        wait_serving(target, process)
    except BaseException:
        server.process.kill()
        server.process.wait(10)
        raise
    return server


@dataclass
class Throughput:
    results: list[metering_load.RunResult] = field(default_factory=list)
    by_key: dict[str, metering_load.RunResult] = field(default_factory=dict)
    scenario_of: dict[str, Scenario] = field(default_factory=dict)
    # PL/pgSQL function statistics of each recording run (when the role may track them).
    functions: dict[str, metering_data.FunctionStats] = field(default_factory=dict)


def run_throughput(
    args: argparse.Namespace,
    url: str,
    server: ServerProcess,
    noop: ServerProcess,
    postmaster: Any,
    accounts: list[str],
    tracked: bool,
) -> tuple[Throughput, list[str]]:
    out = Throughput()
    failures: list[str] = []
    run_id = uuid.uuid4().hex[:8]
    previous: tuple[str, metering_data.FunctionStats] | None = None
    last_end = 0.0

    def settled_stats() -> metering_data.FunctionStats:
        # The no-op run before each recording run usually covers this wait.
        time.sleep(max(0.0, last_end + STATS_PUBLISH_SECONDS - time.monotonic()))
        return metering_data.function_stats(url)

    def close_profile(now: metering_data.FunctionStats) -> None:
        if previous is not None:
            key, before = previous
            out.functions[key] = metering_data.function_delta(before, now)

    for s in scenarios(args):
        target = noop if s.noop else server
        if tracked and not s.noop and s.kind != "health":
            # PostgreSQL idle since the previous recording run: the delta is that run's.
            now = settled_stats()
            close_profile(now)
            previous = (s.key, now)
        job = metering_load.Job(
            kind=s.kind,
            target=target.target,
            accounts=tuple(accounts),
            product_id=CALL_PRODUCT,
            events_per_call=s.events_per_call,
            accounts_per_call=s.accounts_per_call,
            processes=args.processes,
            concurrency=s.concurrency,
            warmup_seconds=args.warmup,
            seconds=s.seconds,
            rpc_timeout_seconds=args.rpc_timeout,
            event_id_prefix=f"m{run_id}.{s.key}",
            label=s.label,
            events_per_message=args.stream_per_message,
        )
        pid = target.process.pid

        def probe(start: float, end: float, pid: int = pid) -> WindowProbe:
            return WindowProbe(url, pid, postmaster, start, end)

        result = metering_load.run(job, probe)
        if not s.noop:
            last_end = time.monotonic()
        out.results.append(result)
        out.by_key[s.key] = result
        out.scenario_of[s.key] = s
        log(
            f"{s.key:<15} {job.processes}x{job.concurrency}: {result.events_per_second:,.0f} "
            f"events/s, {result.calls_per_second:,.1f} calls/s, p50 "
            f"{fmt_ms(result.percentile_ms(0.5))} ms, p99 {fmt_ms(result.percentile_ms(0.99))}"
            f" ms, {result.error_count} errors"
        )
        for failure in result.failures:
            failures.append(f"{s.key}: {failure}")
            print(f"bench: FAILURE {failure}", file=sys.stderr, flush=True)
        for sample in result.error_samples:
            log(f"  error sample: {sample}")
        for p in (server, noop):
            if p.process.poll() is not None:
                raise RuntimeError(f"{p.target} exited with {p.process.returncode}")
    if tracked:
        close_profile(settled_stats())
    return out, failures


def throughput_table(t: Throughput) -> str:
    health = t.by_key.get("health")
    lines = [
        "| scenario | PxC | calls | calls/s | events/s | p50 ms | p99 ms "
        "| failed calls / events | events/s vs no-op | calls/s vs Health/Check |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in t.by_key.items():
        s = t.scenario_of[key]
        twin = t.by_key.get(s.twin) if s.twin else None
        vs_noop = (
            f"{r.events_per_second / twin.events_per_second:.1%}"
            if twin and twin.events_per_second
            else ""
        )
        vs_health = (
            f"{r.calls_per_second / health.calls_per_second:.1%}"
            if health and health.calls_per_second and s.kind != "health"
            else ""
        )
        # Failed calls over the whole run (a call that fails at its deadline may end
        # after the window); failed single events inside the window.
        errors = f"{r.failed_calls_total:,} / {sum(r.event_errors.values()):,}"
        lines.append(
            f"| {s.label} | {r.job.processes}x{r.job.concurrency} | {r.calls:,} "
            f"| {r.calls_per_second:,.1f} | {r.events_per_second:,.0f} "
            f"| {fmt_ms(r.percentile_ms(0.50))} | {fmt_ms(r.percentile_ms(0.99))} "
            f"| {errors} | {vs_noop} | {vs_health} |"
        )
    return "\n".join(lines)


def probe_table(t: Throughput) -> str:
    lines = [
        "| scenario | machine CPU | server | PostgreSQL | load gen | other "
        "| server CPU µs/event | PostgreSQL CPU µs/event | WAL fsyncs/s | WAL bytes/event "
        "| busy backends | waiting on a lock |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for key, r in t.by_key.items():
        p = r.probe
        if p is None:
            continue
        if p.error:
            notes.append(f"\nprobe of {key} failed: {p.error}")
        other = None
        if p.machine_cores is not None and p.server_cores is not None:
            other = p.machine_cores - p.server_cores - (p.postgres_cores or 0) - r.load_cores
        per_event = pg_per_event = None
        if p.server_cores is not None and r.events_per_second:
            per_event = p.server_cores * 1e6 / r.events_per_second
        if p.postgres_cores is not None and r.events_per_second:
            pg_per_event = p.postgres_cores * 1e6 / r.events_per_second
        syncs = None if p.wal_syncs is None else p.wal_syncs / r.seconds
        wal = None if p.wal_bytes is None or not r.events else p.wal_bytes / r.events
        lines.append(
            f"| {t.scenario_of[key].label} | {fmt(p.machine_cores, '.2f')} "
            f"| {fmt(p.server_cores, '.2f')} | {fmt(p.postgres_cores, '.2f')} "
            f"| {r.load_cores:.2f} | {fmt(other, '.2f')} | {fmt(per_event, ',.0f')} "
            f"| {fmt(pg_per_event, ',.0f')} | {fmt(syncs, ',.0f')} | {fmt(wal, ',.0f')} "
            f"| {fmt(p.active_backends, '.1f')} "
            f"| {fmt(p.lock_waiting_backends, '.1f')} |"
        )
    return "\n".join(lines + notes)


def function_table(t: Throughput) -> str:
    """PostgreSQL time per event by PL/pgSQL function (self time: the statements a
    function runs count in its own time, the functions it calls in theirs)."""
    if not t.functions:
        return "(function statistics unavailable: track_functions needs a superuser)"
    totals: dict[str, float] = {}
    for stats in t.functions.values():
        for name, (_, ms) in stats.items():
            totals[name] = totals.get(name, 0.0) + ms
    columns = sorted(totals, key=lambda name: -totals[name])[:PROFILE_COLUMNS]
    lines = [
        "| scenario | events in the database | PL/pgSQL µs/event | "
        + " | ".join(columns)
        + " | other |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " | ---: |",
    ]
    for key, stats in t.functions.items():
        events = stats.get("tally_roll_up", (0, 0.0))[0]
        if not events:
            continue
        total = sum(ms for _, ms in stats.values())
        shown = [stats.get(name, (0, 0.0))[1] for name in columns]
        other = total - sum(shown)
        cells = " | ".join(f"{ms * 1000 / events:,.0f}" for ms in shown)
        lines.append(
            f"| {t.scenario_of[key].label} | {events:,} | {total * 1000 / events:,.0f} "
            f"| {cells} | {other * 1000 / events:,.0f} |"
        )
    return "\n".join(lines)


def recorded_events(url: str, prefix: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(plain_url(url), timeout=30, command_timeout=300)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM usage_events WHERE account_id LIKE $1", prefix + "%"
                )
            )
        finally:
            await conn.close(timeout=30)

    return asyncio.run(run())


def consistency(args: argparse.Namespace, url: str, server: ServerProcess, t: Throughput) -> bool:
    """Rows against what the clients saw acknowledged; VerifyAccount on a sample."""
    real = [r for key, r in t.by_key.items() if not t.scenario_of[key].noop and key != "health"]
    acknowledged = sum(r.events_total for r in real)
    failed_calls = sum(r.failed_calls_total for r in real)
    rows = recorded_events(url, "meter-0")
    same = rows == acknowledged
    verdict = "match" if same else "DIFFER"
    if not same and failed_calls:
        verdict += f" ({failed_calls} calls failed on the client and may have committed)"
    print(
        f"- usage_events rows of the throughput accounts: {rows:,}; events the clients saw "
        f"acknowledged: {acknowledged:,}: {verdict}"
    )
    accounts = account_ids(args.accounts)
    step = max(1, len(accounts) // VERIFY_SAMPLE)
    ok = same or failed_calls > 0
    with TallyClient(server.target, timeout_seconds=60) as client:
        for account in accounts[::step][:VERIFY_SAMPLE]:
            reply = client.verify_account(account)
            state = (
                "consistent" if reply.consistent else "INCONSISTENT " + "; ".join(reply.violations)
            )
            print(
                f"- VerifyAccount {account}: {state} ({reply.entry_count:,} entries, "
                f"balance {reply.stored_balance})"
            )
            ok = ok and reply.consistent
    return ok


# -- GetUsage -----------------------------------------------------------------------------


def timestamp(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


@dataclass(frozen=True)
class UsageCase:
    label: str
    start: datetime
    end: datetime
    period: int
    product_id: str = ""
    check: bool = False  # compare with count(*) over usage_events


@dataclass
class UsageResult:
    case: UsageCase
    cold_ms: float
    latencies_ms: list[float]
    buckets: int
    requests: int
    successful: int
    bucket_sum: int
    expected: metering_data.Counts | None = None
    error: str = ""

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        return ordered[max(1, math.ceil(q * len(ordered))) - 1]

    @property
    def exact(self) -> bool | None:
        if self.expected is None:
            return None
        return (
            self.requests == self.expected.requests
            and self.successful == self.expected.successful
            and self.bucket_sum == self.requests
        )


def usage_cases(data: metering_data.Dataset) -> list[UsageCase]:
    daily, monthly = metering_pb2.USAGE_PERIOD_DAILY, metering_pb2.USAGE_PERIOD_MONTHLY
    end, start = data.end, data.start
    month_ago = end - timedelta(days=30)
    odd_start = start + timedelta(minutes=7, seconds=13, milliseconds=250)
    odd_end = end - timedelta(minutes=4, seconds=2, milliseconds=500)
    p = FILTER_PRODUCT
    return [
        UsageCase("30 days, DAILY", month_ago, end, daily),
        UsageCase(f"30 days, DAILY, product {p}", month_ago, end, daily, p),
        UsageCase("365 days, MONTHLY", start, end, monthly),
        UsageCase(f"365 days, MONTHLY, product {p}", start, end, monthly, p),
        UsageCase("365 days, DAILY (all events)", start, end, daily, check=True),
        UsageCase(f"365 days, DAILY, product {p}", start, end, daily, p, check=True),
        UsageCase("365 days not aligned to 15 min, DAILY", odd_start, odd_end, daily, check=True),
        UsageCase(
            f"365 days not aligned to 15 min, DAILY, product {p}",
            odd_start,
            odd_end,
            daily,
            p,
        ),
    ]


def measure_usage(target: str, url: str, cases: list[UsageCase], calls: int) -> list[UsageResult]:
    out = []
    options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub: Any = TallyClient(channel=channel).metering
        for case in cases:
            request = metering_pb2.GetUsageRequest(
                account_id=BIG_ACCOUNT,
                period=case.period,  # type: ignore[arg-type]
                product_id=case.product_id,
                time_range=metering_pb2.UsageRange(
                    start_time=timestamp(case.start), end_time=timestamp(case.end)
                ),
            )
            timings = []
            reply: Any = None
            error = ""
            for _ in range(calls + 1):
                t = time.perf_counter()
                try:
                    reply = stub.GetUsage(request, timeout=USAGE_TIMEOUT_SECONDS)
                except grpc.RpcError as e:
                    error = f"{e.code().name}: {e.details()}"
                    break
                timings.append((time.perf_counter() - t) * 1000)
            if reply is None or error:
                out.append(UsageResult(case, math.nan, [], 0, 0, 0, 0, error=error))
                log(f"GetUsage {case.label}: {error}")
                continue
            result = UsageResult(
                case,
                cold_ms=timings[0],
                latencies_ms=timings[1:],
                buckets=len(reply.buckets),
                requests=reply.totals.total_requests,
                successful=reply.totals.successful_requests,
                bucket_sum=sum(b.total_requests for b in reply.buckets),
            )
            if case.check:
                result.expected = metering_data.count(
                    url, BIG_ACCOUNT, case.start, case.end, case.product_id
                )
            log(
                f"GetUsage {case.label}: first {result.cold_ms:.0f} ms, p50 "
                f"{result.percentile(0.5):.1f} ms, p99 {result.percentile(0.99):.1f} ms, "
                f"{result.requests:,} requests in {result.buckets} buckets"
            )
            out.append(result)
    return out


def usage_table(results: list[UsageResult]) -> str:
    lines = [
        "| range | first call ms | p50 ms | p99 ms | buckets | total_requests "
        "| = count(*) over usage_events |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.case.label} | {r.error} | | | | | |")
            continue
        exact = ""
        if r.exact is not None and r.expected is not None:
            exact = (
                "yes"
                if r.exact
                else f"NO (count {r.expected.requests:,}, successful "
                f"{r.expected.successful:,} vs {r.successful:,}, buckets sum {r.bucket_sum:,})"
            )
        lines.append(
            f"| {r.case.label} | {r.cold_ms:,.0f} | {r.percentile(0.5):,.1f} "
            f"| {r.percentile(0.99):,.1f} | {r.buckets} | {r.requests:,} | {exact} |"
        )
    return "\n".join(lines)


def stats_plan(url: str, case: UsageCase) -> list[str]:
    """EXPLAIN ANALYZE of tally_service.reads's statistics query for ``case``."""
    from tally_service import ranges, reads

    sql, params = reads.usage_stats_query(
        BIG_ACCOUNT,
        ranges.Range(case.start, case.end),
        ranges.PERIOD_UNITS[case.period],
        ZoneInfo(BIG_TIME_ZONE),
        case.product_id,
    )
    return metering_data.explain(url, sql, params)


# -- export -------------------------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``Vm*`` line of /proc/<pid>/status, in KiB (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def open_file_bytes(pid: int) -> int | None:
    """Bytes of the regular files a process holds open, deleted ones included (the
    temporary files of an export), leaving out its standard streams (the log)."""
    total = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        if int(fd) <= 2:
            continue
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


class RssSampler:
    """VmRSS of a process every RSS_SAMPLE_SECONDS in a thread: the peak, as a cross-check
    of VmHWM; and the peak of the bytes of files it holds open (temporary disk)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self.peak_open_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            rss = proc_status_kib(self.pid, "VmRSS")
            if rss is None:
                return
            self.peak_kib = max(self.peak_kib, rss)
            self.peak_open_bytes = max(self.peak_open_bytes, open_file_bytes(self.pid) or 0)


@dataclass
class ExportResult:
    format: str
    rows_expected: int
    seconds: float
    first_chunk_seconds: float
    bytes: int
    chunks: int
    rows_in_file: int | None
    hwm_before_kib: int | None
    hwm_after_kib: int | None
    rss_after_kib: int | None
    rss_peak_sampled_kib: int
    open_files_peak_bytes: int
    server_cpu_seconds: float
    file_name: str
    error: str = ""

    @property
    def hwm_growth_mib(self) -> float | None:
        if self.hwm_before_kib is None or self.hwm_after_kib is None:
            return None
        return (self.hwm_after_kib - self.hwm_before_kib) / 1024


def count_xlsx_rows(path: Path) -> int:
    """``<row`` elements of the first sheet, streamed through the zip."""
    count, carry = 0, b""
    with zipfile.ZipFile(path) as archive, archive.open("xl/worksheets/sheet1.xml") as sheet:
        while chunk := sheet.read(1 << 20):
            data = carry + chunk
            count += data.count(b"<row ")
            carry = data[-4:]
    return count


def cpu_seconds(pid: int) -> float:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def measure_export(
    server: ServerProcess,
    report_format: int,
    name: str,
    start: datetime,
    end: datetime,
    rows: int,
    workdir: Path,
) -> ExportResult:
    pid = server.process.pid
    hwm_before = proc_status_kib(pid, "VmHWM")
    cpu_before = cpu_seconds(pid)
    request = metering_pb2.ExportUsageReportRequest(
        account_id=BIG_ACCOUNT,
        format=report_format,  # type: ignore[arg-type]
        time_range=metering_pb2.UsageRange(start_time=timestamp(start), end_time=timestamp(end)),
    )
    path = workdir / f"export.{name.lower()}"
    size = chunks = 0
    first = math.nan
    file_name = ""
    error = ""
    options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    t = time.perf_counter()
    with (
        RssSampler(pid) as sampler,
        grpc.insecure_channel(server.target, options=options) as channel,
        path.open("wb") as out,
    ):
        stub: Any = TallyClient(channel=channel).metering
        try:
            for message in stub.ExportUsageReport(request, timeout=EXPORT_TIMEOUT_SECONDS):
                if not chunks:
                    first = time.perf_counter() - t
                    file_name = message.file_name
                chunks += 1
                size += len(message.data)
                out.write(message.data)
        except grpc.RpcError as e:
            error = f"{e.code().name}: {e.details()}"
    seconds = time.perf_counter() - t
    hwm_after = proc_status_kib(pid, "VmHWM")
    rss_after = proc_status_kib(pid, "VmRSS")
    cpu = cpu_seconds(pid) - cpu_before
    rows_in_file: int | None = None
    if not error:
        if name == "CSV":
            with path.open("rb") as f:
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            rows_in_file = lines - 1  # the header
        else:
            rows_in_file = count_xlsx_rows(path) - 1
    path.unlink(missing_ok=True)
    return ExportResult(
        format=name,
        rows_expected=rows,
        seconds=seconds,
        first_chunk_seconds=first,
        bytes=size,
        chunks=chunks,
        rows_in_file=rows_in_file,
        hwm_before_kib=hwm_before,
        hwm_after_kib=hwm_after,
        rss_after_kib=rss_after,
        rss_peak_sampled_kib=sampler.peak_kib,
        open_files_peak_bytes=sampler.peak_open_bytes,
        server_cpu_seconds=cpu,
        file_name=file_name,
        error=error,
    )


def kib_mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1024:,.0f}"


def export_table(results: list[ExportResult]) -> str:
    lines = [
        "| format | rows | file MB | wall s | first chunk s | MB/s | rows/s | server CPU s "
        "| server VmHWM before → after MiB | peak RSS growth MiB | rows in file |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.format} | {r.rows_expected:,} | {r.error} | | | | | | | | |")
            continue
        check = (
            "n/a"
            if r.rows_in_file is None
            else ("matches" if r.rows_in_file == r.rows_expected else f"{r.rows_in_file:,} (!)")
        )
        growth = r.hwm_growth_mib
        lines.append(
            f"| {r.format} | {r.rows_expected:,} | {r.bytes / 1e6:,.1f} | {r.seconds:,.1f} "
            f"| {r.first_chunk_seconds:,.1f} | {r.bytes / 1e6 / r.seconds:,.1f} "
            f"| {r.rows_expected / r.seconds:,.0f} | {r.server_cpu_seconds:,.1f} "
            f"| {kib_mib(r.hwm_before_kib)} → {kib_mib(r.hwm_after_kib)} "
            f"| {fmt(growth, ',.1f')} | {check} |"
        )
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------


def planned_seconds(args: argparse.Namespace) -> float:
    """A generous bound on the whole run (the default hard time limit)."""
    plan = 60.0
    if not args.skip_throughput:
        for s in scenarios(args):
            plan += args.warmup + s.seconds + 15  # plus process start-up and the tail
        plan += args.accounts / 20 + STATS_PUBLISH_SECONDS + 30
    if not args.skip_load:
        plan += args.events / 20_000  # COPY, rollups, VACUUM
        plan += 8 * (args.usage_calls + 1) * 1.5 + 60  # GetUsage, checks, plans
        plan += args.export_rows / 5_000 + 60  # both exports and two restarts
    return plan


def environment(facts: ServerFacts, args: argparse.Namespace) -> str:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    settings = ", ".join(f"{k}={v}" for k, v in facts.settings.items())
    return "\n".join(
        [
            f"- CPUs: {os.cpu_count()} (usable by this process: {affinity})",
            f"- OS: {platform.system()} {platform.release()} {platform.machine()}",
            f"- Python: {platform.python_implementation()} {platform.python_version()}, "
            f"grpcio {grpc.__version__}",
            f"- PostgreSQL: {facts.version}",
            f"- PostgreSQL settings: {settings} (the server's sessions keep the default)",
            f"- load: {args.processes} processes x {args.concurrency} coroutines (unary), "
            f"x {args.batch_concurrency} (batches, streams); {args.warmup:g}s warm-up + "
            f"{args.seconds:g}s (unary) or {args.batch_seconds:g}s (batches, streams) measured "
            f"per run; server pool {args.pool_size} connections",
        ]
    )


@dataclass
class Report:
    facts: ServerFacts | None = None
    throughput: Throughput | None = None
    load: metering_data.LoadResult | None = None
    data: metering_data.Dataset | None = None
    usage: list[UsageResult] = field(default_factory=list)
    plans: dict[str, list[str]] = field(default_factory=dict)
    exports: list[ExportResult] = field(default_factory=list)
    logs: list[tuple[str, str]] = field(default_factory=list)
    status: int = 0


def dataset(args: argparse.Namespace) -> metering_data.Dataset:
    zone = ZoneInfo(BIG_TIME_ZONE)
    today = datetime.now(zone).date()
    end = datetime(today.year, today.month, today.day, tzinfo=zone).astimezone(UTC)
    return metering_data.Dataset(BIG_ACCOUNT, args.events, end - timedelta(days=365), end)


def benchmark(args: argparse.Namespace, workdir: Path, report: Report) -> None:
    servers: list[ServerProcess] = []

    def new_server(url: str) -> ServerProcess:
        path = workdir / f"server-{len(servers) + 1}.log"
        server = start_server(url, path, pool_size=args.pool_size)
        servers.append(server)
        log(f"server SERVING on {server.target} (pid {server.process.pid})")
        return server

    def stop(server: ServerProcess) -> None:
        code = server.stop()
        log(f"server pid {server.process.pid} stopped (exit code {code})")
        if code != 0:
            report.status = 1

    with (
        admin_url(args.database_url or None) as admin,
        fresh_database(admin, keep=args.keep_database) as url,
    ):
        report.facts = server_facts(url)
        log(f"PostgreSQL ready: {report.facts.version}")
        postmaster = find_postmaster(url)
        # Before the server opens its connections: the setting applies to new sessions.
        tracked = metering_data.enable_function_stats(url)
        server = new_server(url)
        try:
            accounts = account_ids(args.accounts)
            t = time.monotonic()
            set_up(
                url,
                server.target,
                accounts if not args.skip_throughput else [],
                True,
                args.fresh_plans,
            )
            log(f"products and {len(accounts):,} funded accounts in {time.monotonic() - t:.1f}s")

            if not args.skip_throughput:
                noop = start_noop(workdir / "noop.log")
                try:
                    report.throughput, failures = run_throughput(
                        args, url, server, noop, postmaster, accounts, tracked
                    )
                finally:
                    noop.stop()
                    report.logs.append(("no-op server", noop.log()))
                if failures:
                    report.status = 1
                print("\n## Consistency after the throughput runs\n", flush=True)
                if not consistency(args, url, server, report.throughput):
                    report.status = 1

            if not args.skip_load:
                data = report.data = dataset(args)
                log(
                    f"loading {data.events:,} events of {BIG_ACCOUNT} from "
                    f"{data.start.isoformat()} to {data.end.isoformat()}"
                )
                report.load = metering_data.load(url, data, log)

                cases = usage_cases(data)
                report.usage = measure_usage(server.target, url, cases, args.usage_calls)
                for r in report.usage:
                    if r.error or r.exact is False:
                        report.status = 1
                for case in (cases[2], cases[4], cases[6]):
                    log(f"EXPLAIN ANALYZE: {case.label}")
                    report.plans[case.label] = stats_plan(url, case)

                rows = args.export_rows
                first = data.events - rows
                start = data.started_at(first)
                expected = metering_data.count(url, BIG_ACCOUNT, start, data.end)
                log(
                    f"export range {start.isoformat()} .. {data.end.isoformat()}: "
                    f"{expected.requests:,} rows"
                )
                report.plans[f"the export's query, {expected.requests:,} rows"] = (
                    metering_data.explain(
                        url,
                        metering_data.EXPORT_QUERY,
                        {"account_id": BIG_ACCOUNT, "start": start, "end": data.end},
                        metering_data.EXPORT_SETTINGS,
                    )
                )
                for name, fmt_value in (
                    ("XLSX", metering_pb2.REPORT_FORMAT_XLSX),
                    ("CSV", metering_pb2.REPORT_FORMAT_CSV),
                ):
                    stop(server)
                    server = new_server(url)
                    result = measure_export(
                        server, fmt_value, name, start, data.end, expected.requests, workdir
                    )
                    log(
                        f"export {name}: {result.seconds:.1f}s, {result.bytes / 1e6:,.1f} MB, "
                        f"VmHWM growth {fmt(result.hwm_growth_mib, ',.1f')} MiB, "
                        f"{result.error or 'ok'}"
                    )
                    report.exports.append(result)
                    if result.error or result.rows_in_file != expected.requests:
                        report.status = 1
        except BaseException:
            for s in servers[-1:]:
                tail = s.log().splitlines()[-40:]
                print("bench: server log (last lines):", *tail, sep="\n    ", file=sys.stderr)
            raise
        finally:
            for s in servers:
                if s.process.poll() is None:
                    stop(s)
                report.logs.append((f"server pid {s.process.pid}", s.log()))
            if args.server_log:
                Path(args.server_log).write_text(
                    "\n".join(f"==> {name} <==\n{text}" for name, text in report.logs)
                )


def print_report(args: argparse.Namespace, report: Report) -> None:
    out = io.StringIO()

    def p(*lines: str) -> None:
        print(*lines, sep="\n", file=out)

    if report.facts is not None:
        p("", "## Environment", "", environment(report.facts, args))
    if report.throughput is not None:
        p("", "## Recording throughput", "", throughput_table(report.throughput))
        p("", "## During the measured windows", "", probe_table(report.throughput))
        p(
            "",
            "## PostgreSQL time per event by function (whole runs, self time)",
            "",
            function_table(report.throughput),
        )
        errors = {
            key: {**r.errors, **r.event_errors}
            for key, r in report.throughput.by_key.items()
            if r.errors or r.event_errors
        }
        if errors:
            p("", f"errors by status code: {errors}")
    if report.load is not None and report.data is not None:
        ld, data = report.load, report.data
        p(
            "",
            f"## Large account: {data.events:,} events of {BIG_ACCOUNT} "
            f"({BIG_TIME_ZONE}), {data.start.isoformat()} .. {data.end.isoformat()}",
            "",
            f"- COPY: {ld.rows:,} rows in {ld.copy_seconds:,.1f}s = "
            f"{ld.rows_per_second:,.0f} rows/s over {ld.connections} connections; row "
            f"triggers (foreign keys, credit type) "
            f"{'skipped' if ld.triggers_skipped else 'kept'}",
            f"- rollups: {ld.rollup_rows:,} rows by one INSERT ... SELECT ... GROUP BY in "
            f"{ld.rollup_seconds:,.1f}s; VACUUM (ANALYZE) {ld.vacuum_seconds:,.1f}s",
            f"- sizes: {', '.join(metering_data.describe_sizes(ld.sizes))}",
        )
    if report.usage:
        p("", "## GetUsage latency (sequential calls)", "", usage_table(report.usage))
    for label, plan in report.plans.items():
        p("", f"### EXPLAIN (ANALYZE, BUFFERS): {label}", "", "```")
        p(*plan[:PLAN_LINES])
        if len(plan) > PLAN_LINES:
            p(f"... {len(plan) - PLAN_LINES} more lines")
        p("```")
    if report.exports:
        p("", "## ExportUsageReport", "", export_table(report.exports))
        for r in report.exports:
            p(
                f"- {r.format}: {r.file_name}, {r.chunks:,} chunks; sampled peak RSS "
                f"{kib_mib(r.rss_peak_sampled_kib)} MiB, RSS after {kib_mib(r.rss_after_kib)}"
                f" MiB; files held open by the server at most "
                f"{r.open_files_peak_bytes / 2**20:,.1f} MiB"
            )
    p("", "## Server logs", "")
    counts: Counter[str] = Counter()
    for name, text in report.logs:
        warnings = [line for line in text.splitlines() if " WARNING " in line]
        problems = log_problems(text)
        counts["problems"] += len(problems)
        p(f"- {name}: {len(warnings)} warning(s), {len(problems)} error line(s)")
        for line in sorted(set(warnings))[:5]:
            p(f"    {line}")
        for line in problems[:20]:
            p(f"    {line}")
    if counts["problems"]:
        report.status = 1
    print(out.getvalue(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    limit = args.time_limit or planned_seconds(args)
    log(f"hard time limit {limit:.0f}s")
    report = Report()
    started = time.monotonic()
    try:
        with (
            hard_time_limit(limit),
            tempfile.TemporaryDirectory(prefix="tally-bench-metering-") as workdir,
        ):
            benchmark(args, Path(workdir), report)
    except TimeLimitExceeded as e:
        print(f"bench: {e}", file=sys.stderr)
        print_report(args, report)
        return 2
    print_report(args, report)
    log(f"total {time.monotonic() - started:,.0f}s")
    return report.status


if __name__ == "__main__":
    sys.exit(main())
