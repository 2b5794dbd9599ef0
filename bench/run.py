"""Tally benchmark: throughput and latency of the server on one machine.

    python -m bench.run [--seconds N] [--processes P] [--concurrency C[,C...]]
                        [--database-url URL]

Starts PostgreSQL (the embedded pgserver in a temporary directory, or the server at
``--database-url``) with a fresh, migrated database; starts ``tally_service serve`` as
a subprocess on a free loopback port; creates the accounts with ``TallyClient``; then,
for each concurrency level, runs these scenarios for ``--seconds`` each with a
multi-process load generator (``bench.load``):

    noop       grpc.health.v1 Health/Check on the same server (no database): the ceiling
    balance    GetBalance over the accounts
    pair       Reserve then Capture of that hold, spread over the accounts
    pair-hot   Reserve then Capture, all on one hot account
    debit      Debit spread over the accounts (the control for debit-hot)
    debit-hot  Debit on the hot account

and prints a markdown table. At the end it verifies the hot account and a sample of the
others with LedgerService.VerifyAccount, scans the server log for errors, and stops the
server (SIGTERM) and the database. The exit status is non-zero when a check failed.
"""

import argparse
import contextlib
import math
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench import load
from bench.postgres import ServerFacts, admin_url, analyze, fresh_database, server_facts
from bench.probe import WindowProbe, find_postmaster
from bench.server import ServerProcess, start_server
from tally_client import TallyClient
from tally_client.amounts import from_wire

ACCOUNT_TOP_UP = "1000000"
# One movement moves at most 1,000,000,000 credits, so the hot account gets several.
HOT_TOP_UP = "1000000000"
HOT_TOP_UPS = 3
OP_AMOUNT = "0.01"
HOT_ACCOUNT = "bench-hot"
SETUP_THREADS = 16
VERIFY_SAMPLE = 10
CLIENT_TIMEOUT_SECONDS = 10.0

LABELS = {
    load.NOOP: "Health/Check (no-op ceiling, no database)",
    load.BALANCE: "GetBalance, {n} accounts",
    load.PAIR: "Reserve+Capture, {n} accounts",
    load.PAIR_HOT: "Reserve+Capture, one hot account",
    load.DEBIT: "Debit, {n} accounts (control)",
    load.DEBIT_HOT: "Debit, one hot account",
}


def label(r: load.RunResult) -> str:
    return LABELS[r.job.kind].format(n=f"{len(r.job.accounts):,}")


DESCRIPTION = "Tally benchmark: throughput and latency of the server on one machine."


class TimeLimitExceeded(Exception):
    pass


def _positive_ints(value: str) -> list[int]:
    levels = [int(part) for part in value.split(",") if part.strip()]
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("give positive integers, e.g. 32 or 8,32,64")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=DESCRIPTION)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds per run")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--concurrency",
        type=_positive_ints,
        default=[32],
        help="coroutines per process; a comma-separated list runs every level (default 32)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="PostgreSQL server to create the benchmark database on (default: embedded)",
    )
    parser.add_argument("--accounts", type=int, default=1000, help="accounts for spread runs")
    parser.add_argument("--pool-size", type=int, default=20, help="TALLY_DB_POOL_SIZE")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {','.join(load.KINDS)}"
    )
    parser.add_argument("--rpc-timeout", type=float, default=5.0, help="deadline of every RPC")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="hard limit on the whole run in seconds (default: derived from the plan)",
    )
    parser.add_argument("--server-log", default="", help="copy the server log here at the end")
    parser.add_argument(
        "--keep-database", action="store_true", help="do not drop the benchmark database"
    )
    parser.add_argument(
        "--fresh-plans",
        action="store_true",
        help="no ANALYZE after the set-up: the server's plans stay those made on empty "
        "tables (the figures before 2026-12-01)",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.processes < 1 or args.accounts < 1:
        parser.error("--seconds, --processes and --accounts must be positive")
    kinds = [k.strip() for k in args.only.split(",") if k.strip()] or list(load.KINDS)
    unknown = set(kinds) - set(load.KINDS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; known: {', '.join(load.KINDS)}")
    args.kinds = kinds
    return args


def planned_seconds(args: argparse.Namespace) -> float:
    runs = len(args.kinds) * len(args.concurrency)
    # Per run: process start-up (spawn, imports) and the tail after the window.
    per_run = float(args.warmup + args.seconds + 2 * args.rpc_timeout + 15)
    # Plus PostgreSQL, migrations, the server, funding the accounts, and stopping.
    return 120 + runs * per_run


@contextlib.contextmanager
def hard_time_limit(seconds: float) -> Iterator[None]:
    """Raises TimeLimitExceeded in the main thread after ``seconds``; if the clean-up
    that follows hangs as well, exits the process 60 s later."""

    def last_resort(signum: int, frame: FrameType | None) -> None:
        print("bench: clean-up did not finish; exiting", file=sys.stderr, flush=True)
        os._exit(3)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGALRM, last_resort)
        signal.alarm(60)
        raise TimeLimitExceeded(f"the benchmark exceeded its time limit of {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, math.ceil(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def account_ids(n: int) -> list[str]:
    return [f"bench-{i:05d}" for i in range(n)]


def set_up_accounts(target: str, accounts: list[str]) -> None:
    """Creates the accounts and the hot one and funds them (through TallyClient)."""
    with TallyClient(target, timeout_seconds=CLIENT_TIMEOUT_SECONDS) as client:

        def fund(account: str) -> None:
            client.create_account(account)
            client.top_up(account, ACCOUNT_TOP_UP, reference="bench")

        with ThreadPoolExecutor(SETUP_THREADS) as pool:
            # list(): re-raise the first failure.
            list(pool.map(fund, accounts, timeout=300))
        client.create_account(HOT_ACCOUNT)
        for _ in range(HOT_TOP_UPS):
            client.top_up(HOT_ACCOUNT, HOT_TOP_UP, reference="bench")


@dataclass
class Verification:
    account: str
    consistent: bool
    entries: int
    balance: str
    violations: list[str]


def verify(target: str, accounts: list[str]) -> list[Verification]:
    step = max(1, len(accounts) // VERIFY_SAMPLE)
    sample = [HOT_ACCOUNT, *accounts[::step][:VERIFY_SAMPLE]]
    out = []
    with TallyClient(target, timeout_seconds=30) as client:
        for account in sample:
            reply = client.verify_account(account)
            out.append(
                Verification(
                    account,
                    reply.consistent,
                    reply.entry_count,
                    reply.stored_balance,
                    list(reply.violations),
                )
            )
    return out


def fmt_ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"  # NaN: no successful operation


def table(results: list[load.RunResult]) -> str:
    ceilings = {r.job.concurrency: r.throughput for r in results if r.job.kind == load.NOOP}
    lines = [
        "| scenario | PxC | ops | ops/s | p50 ms | p99 ms | errors | vs no-op |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ceiling = ceilings.get(r.job.concurrency)
        ratio = f"{r.throughput / ceiling:.1%}" if ceiling else "n/a"
        lines.append(
            f"| {label(r)} | {r.job.processes}x{r.job.concurrency} | {r.ops:,} "
            f"| {r.throughput:,.0f} | {fmt_ms(r.percentile_ms(0.50))} "
            f"| {fmt_ms(r.percentile_ms(0.99))} | {r.error_count:,} | {ratio} |"
        )
    return "\n".join(lines)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def usage_table(results: list[load.RunResult]) -> str:
    """CPU (in cores; the machine has os.cpu_count()) and PostgreSQL activity."""
    lines = [
        "| scenario | PxC | machine CPU | server | PostgreSQL | load gen | other "
        "| server CPU ms/op | WAL fsyncs/s | WAL bytes/op | busy backends | waiting on a lock |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for r in results:
        p = r.probe
        if p is None:
            continue
        if p.error:
            notes.append(f"\nprobe of {r.job.kind}@{r.job.concurrency} failed: {p.error}")
        syncs = None if p.wal_syncs is None else p.wal_syncs / r.seconds
        per_op = None if p.wal_bytes is None or not r.ops else p.wal_bytes / r.ops
        other = None
        if p.machine_cores is not None and p.server_cores is not None:
            other = p.machine_cores - p.server_cores - (p.postgres_cores or 0) - r.load_cores
        server_ms = None
        if p.server_cores is not None and r.throughput:
            server_ms = p.server_cores * 1000 / r.throughput
        lines.append(
            f"| {label(r)} | {r.job.processes}x{r.job.concurrency} "
            f"| {fmt(p.machine_cores, '.2f')} | {fmt(p.server_cores, '.2f')} "
            f"| {fmt(p.postgres_cores, '.2f')} | {r.load_cores:.2f} | {fmt(other, '.2f')} "
            f"| {fmt(server_ms, '.2f')} | {fmt(syncs, ',.0f')} "
            f"| {fmt(per_op, ',.0f')} | {fmt(p.active_backends, '.1f')} "
            f"| {fmt(p.lock_waiting_backends, '.1f')} |"
        )
    return "\n".join(lines + notes)


def environment(facts: ServerFacts, args: argparse.Namespace) -> str:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    settings = ", ".join(f"{k}={v}" for k, v in facts.settings.items())
    return "\n".join(
        [
            f"- CPUs: {os.cpu_count()} (usable by this process: {affinity})",
            f"- OS: {platform.system()} {platform.release()} {platform.machine()}",
            f"- Python: {platform.python_implementation()} {platform.python_version()}",
            f"- PostgreSQL: {facts.version}",
            f"- PostgreSQL settings: {settings}",
            f"- load: {args.processes} processes x "
            f"{'/'.join(map(str, args.concurrency))} coroutines, "
            f"{args.warmup:g}s warm-up + {args.seconds:g}s measured per run, "
            f"server pool {args.pool_size} connections",
        ]
    )


def log_problems(log: str) -> list[str]:
    """Lines of the server log that say something went wrong."""
    markers = ("Traceback", " ERROR ", " CRITICAL ", "Exception", "Error:")
    return [line for line in log.splitlines() if any(m in line for m in markers)]


def hot_cross_check(results: list[load.RunResult], hot: Verification) -> str:
    """The hot account's ledger against what the clients saw succeed."""
    hot_ok = sum(r.ok_total for r in results if r.job.kind in load.HOT_KINDS)
    hot_errors = sum(r.errors_total for r in results if r.job.kind in load.HOT_KINDS)
    expected_entries = HOT_TOP_UPS + hot_ok
    expected_balance = from_wire(HOT_TOP_UP) * HOT_TOP_UPS - from_wire(OP_AMOUNT) * hot_ok
    actual_balance = from_wire(hot.balance)
    same = hot.entries == expected_entries and actual_balance == expected_balance
    verdict = "match" if same else "DIFFER"
    if not same and hot_errors:
        verdict += f" ({hot_errors} operations failed on the client and may have applied)"
    return (
        f"hot account: {hot.entries:,} ledger entries (clients saw {HOT_TOP_UPS} top-ups + "
        f"{hot_ok:,} successful money movements = {expected_entries:,}), balance "
        f"{hot.balance} (expected {expected_balance}): {verdict}"
    )


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    status = 0
    server: ServerProcess | None = None
    log_path = workdir / "server.log"
    with (
        admin_url(args.database_url or None) as admin,
        fresh_database(admin, keep=args.keep_database) as url,
    ):
        facts = server_facts(url)
        print(f"bench: PostgreSQL ready: {facts.version}", flush=True)
        postmaster = find_postmaster(url)
        try:
            server = start_server(url, log_path, pool_size=args.pool_size)
            print(f"bench: server SERVING on {server.target}", flush=True)
            accounts = account_ids(args.accounts)
            started = time.monotonic()
            set_up_accounts(server.target, accounts)
            if not args.fresh_plans:
                print(f"bench: ANALYZE {', '.join(analyze(url))}", flush=True)
            print(
                f"bench: {len(accounts):,} accounts + {HOT_ACCOUNT} funded in "
                f"{time.monotonic() - started:.1f}s",
                flush=True,
            )
            results: list[load.RunResult] = []
            run_id = uuid.uuid4().hex[:8]
            for concurrency in args.concurrency:
                for kind in args.kinds:
                    job = load.Job(
                        kind=kind,
                        target=server.target,
                        accounts=(HOT_ACCOUNT,) if kind in load.HOT_KINDS else tuple(accounts),
                        amount=OP_AMOUNT,
                        processes=args.processes,
                        concurrency=concurrency,
                        warmup_seconds=args.warmup,
                        seconds=args.seconds,
                        rpc_timeout_seconds=args.rpc_timeout,
                        request_id_prefix=f"bench-{run_id}.{kind}.c{concurrency}",
                    )
                    pid = server.process.pid

                    def probe(start: float, end: float, pid: int = pid) -> WindowProbe:
                        return WindowProbe(url, pid, postmaster, start, end)

                    result = load.run(job, probe)
                    results.append(result)
                    print(
                        f"bench: {kind:<9} {args.processes}x{concurrency}: "
                        f"{result.throughput:,.0f} ops/s, p50 {fmt_ms(result.percentile_ms(0.5))}"
                        f" ms, p99 {fmt_ms(result.percentile_ms(0.99))} ms, "
                        f"{result.error_count} errors",
                        flush=True,
                    )
                    for failure in result.failures:
                        status = 1
                        print(f"bench: FAILURE {failure}", file=sys.stderr, flush=True)
                    for sample in result.error_samples:
                        print(f"bench:   error sample: {sample}", flush=True)
                    if server.process.poll() is not None:
                        raise RuntimeError(f"server exited with {server.process.returncode}")

            checks = verify(server.target, accounts)
        except BaseException:
            if log_path.exists():
                tail = log_path.read_text(errors="replace").splitlines()[-40:]
                print("bench: server log (last lines):", *tail, sep="\n    ", file=sys.stderr)
            raise
        finally:
            if server is not None:
                code = server.stop()
                print(f"bench: server stopped (exit code {code})", flush=True)
                if code != 0:
                    status = 1
                if args.server_log:
                    Path(args.server_log).write_text(server.log())

    print()
    print("## Environment\n")
    print(environment(facts, args))
    print()
    print("## Results\n")
    print(table(results))
    print()
    print("## During the measured windows\n")
    print(usage_table(results))
    print()
    print("## Consistency (LedgerService.VerifyAccount)\n")
    for check in checks:
        state = "consistent" if check.consistent else "INCONSISTENT " + "; ".join(check.violations)
        print(f"- {check.account}: {state} ({check.entries:,} entries, balance {check.balance})")
    if not all(c.consistent for c in checks):
        status = 1
    if set(load.HOT_KINDS) & set(args.kinds):
        print(f"- {hot_cross_check(results, checks[0])}")
    errors = {f"{r.job.kind}@{r.job.concurrency}": dict(r.errors) for r in results if r.errors}
    if errors:
        print(f"\nerrors by status code: {errors}")
    server_log = log_path.read_text(errors="replace")
    warnings = [line for line in server_log.splitlines() if " WARNING " in line]
    print(f"\nserver log: {len(warnings)} warning(s)")
    for line in warnings[:10]:
        print(f"    {line}")
    problems = log_problems(server_log)
    print(f"server log: {len(problems)} error line(s)")
    for line in problems[:20]:
        print(f"    {line}")
    if problems:
        status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    limit = args.time_limit or planned_seconds(args)
    print(f"bench: hard time limit {limit:.0f}s", flush=True)
    try:
        with (
            hard_time_limit(limit),
            tempfile.TemporaryDirectory(prefix="tally-bench-") as workdir,
        ):
            return benchmark(args, Path(workdir))
    except TimeLimitExceeded as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
