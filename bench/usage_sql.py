"""Usage recording in PostgreSQL alone: what one event costs inside ``tally_record_usage``,
with no gRPC and no Python between the calls.

    python -m bench.usage_sql [--groups 1,10,100,1000] [--seconds N] [--rounds R]
                              [--explain] [--database-url URL]

Creates a fresh migrated database (the embedded pgserver unless a URL is given), a
priced product, and funded accounts (each top-up a purchased grant, so every charge
draws a grant), then calls ``tally_record_usage`` exactly as the server does for a
RecordUsageBatch (one statement, one transaction, durable commit, ``tally.caller`` set):
groups of 1, 10, 100 and 1,000 new events of one account each (a group of 1 or 10 is
what the server's group commit makes of unary RecordUsage calls), every event priced
and charged, so each gets its ledger entry. Reports, per group size, the wall time per
event and the CPU time of the PostgreSQL backend per event and per call (read from /proc
through psutil; the backend's own work, though on a crowded 2-core VM it still moves
by 20 to 40 % between windows: compare versions alternately).

``--explain`` then runs one group of each size through a profiled copy of the function
(the instant each statement starts, and EXPLAIN (ANALYZE, BUFFERS) of the statement that
writes, with its trigger times) and ``track_functions = 'all'``: where the time of one
call goes. The timings of EXPLAIN ANALYZE include its own instrumentation.
"""

import argparse
import asyncio
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.postgres import admin_url, fresh_database
from bench.probe import plain_url
from tally_service.db import UsageItem

DESCRIPTION = "tally_record_usage in PostgreSQL alone: µs per event and per call, by group size."
PRODUCT = "bench-call"
PRICE_MICROS = 1_000  # 0.001 credits per event, as bench.metering's load
TOP_UP_MICROS = 1_000_000 * 1_000_000
ENDPOINTS = ("/v1/pan/verify", "/v2/pan/verify", "/v1/pan/bulk", "/v1/gst/verify")
CALLER = "bench-caller"
RECORD = (
    "SELECT tally_record_usage(p_events => $1) "
    "FROM (SELECT set_config('tally.caller', $2, true)) AS audit"
)
TIMEOUT = 120.0
# Events recorded per group size before the ANALYZE: enough rows that no plan made on
# these statistics prefers a scan of the table to its index (with 48 rows, a spread group
# of 16 planned a Seq Scan of usage_events for each event's lookup).
WARM_UP_EVENTS = 1_000


def setup_sql(accounts: int) -> str:
    return f"""
SELECT tally_upsert_product('bench-product', '\\x00', '{PRODUCT}', '', {PRICE_MICROS},
                            false, 0);
SELECT count(tally_create_account('bench-create-' || i, '\\x00', 'usage-' || i, '', '',
                                  'UTC', 'CREDIT', 0, NULL))
FROM generate_series(0, {accounts - 1}) AS i;
SELECT count(tally_move('bench-top-up-' || i, '\\x00', 'TopUp', 'usage-' || i, 'credit',
                        {TOP_UP_MICROS}, '', 'bench', '{{}}', '{{"type": "purchased"}}'))
FROM generate_series(0, {accounts - 1}) AS i;
"""


def events(accounts: str | list[str], prefix: str, n: int) -> list[UsageItem]:
    """``n`` completed events as the servicer sends them: of one account, or the i-th of
    ``accounts[i % len(accounts)]``."""
    now = datetime.now(UTC)
    walk = [accounts] if isinstance(accounts, str) else accounts
    items = [
        UsageItem(
            idx=i,
            account_id=walk[i % len(walk)],
            event_id=f"{prefix}.{i}",
            product_id=PRODUCT,
            endpoint=ENDPOINTS[i % len(ENDPOINTS)],
            status="completed",
            success=True,
            status_code=200,
            message="",
            quantity=1,
            credits=None,
            started_at=now,
            completed_at=now,
            processing_time_ms=40 + i % 200,
            request_metadata="{}",
            result_metadata="{}",
            webhook_url="",
            fingerprint=secrets.token_bytes(32),
        )
        for i in range(n)
    ]
    return items


@dataclass
class Sample:
    group: int
    calls: int
    events: int
    wall_seconds: float
    backend_cpu_seconds: float | None

    def wall_us(self) -> float:
        return self.wall_seconds / self.events * 1e6

    def cpu_us(self) -> float | None:
        if self.backend_cpu_seconds is None:
            return None
        return self.backend_cpu_seconds / self.events * 1e6


def _cpu(process: Any) -> float | None:
    if process is None:
        return None
    times = process.cpu_times()
    return float(times.user + times.system)


class Caller:
    """One connection calling ``tally_record_usage`` in a closed loop."""

    def __init__(self, conn: asyncpg.Connection, accounts: int, spread: bool = False) -> None:
        self.conn = conn
        self.accounts = accounts
        self.spread = spread
        self.n = 0
        self.process: Any = None

    async def start(self) -> None:
        pid = await self.conn.fetchval("SELECT pg_backend_pid()")
        try:
            self.process = psutil.Process(pid)
            self.process.cpu_times()
        except (psutil.Error, OSError):
            self.process = None  # a server on another machine: wall time only

    def walk(self, group: int) -> str | list[str]:
        """The account of the next call, or (``spread``) its events' accounts: ``group``
        consecutive ones (at most every account), as the unary lane's groups are."""
        first = self.n
        self.n += 1
        if not self.spread:
            return f"usage-{first % self.accounts}"
        k = min(group, self.accounts)
        return [f"usage-{(first * k + j) % self.accounts}" for j in range(k)]

    async def call(self, group: int) -> None:
        payload = events(self.walk(group), f"{os.getpid()}-{self.n}-{secrets.token_hex(4)}", group)
        raw = await self.conn.fetchval(RECORD, payload, CALLER, timeout=TIMEOUT)
        answer = json.loads(raw)
        response = answer["response"]
        if len(response) != group or not all(isinstance(r, list) for r in response):
            raise RuntimeError(f"unexpected answer: {str(response)[:500]}")

    async def measure(self, group: int, seconds: float) -> Sample:
        calls = 0
        cpu0 = _cpu(self.process)
        t0 = time.perf_counter()
        while True:
            await self.call(group)
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds and calls >= 3:
                break
        cpu1 = _cpu(self.process)
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        return Sample(group, calls, calls * group, elapsed, cpu)


# The statements of tally_record_usage, as its source marks them (for --explain).
# (Those no longer in the source are left out.)
_STEPS = (
    "    -- Lock every account",
    "    -- The events, priced",
    "    -- Each item's outcome",
    "    -- The accounts whose group",
    "    SELECT array_agg(DISTINCT",
    "    -- The writes",
    "    -- The reports and thresholds",
    "    -- Grants: each",
    "    -- Auto-reload once",
)
# The end of the statement that writes: its INTO (left out of the copy) and what follows.
_WRITES_END = re.compile(
    r"\n *INTO v_results, v_charged_accounts, v_charged, v_before[^\n;]*([^;]*);"
)
_VARIABLES = ("v_items", "v_outcome", "v_winner", "v_available", "v_stamp", "v_at")


def profiled_copy(source: str) -> str | None:
    """``tally_record_usage_profiled``: a copy of the function that reports, as notices,
    the instant each statement starts, and runs the statement that writes under
    EXPLAIN (ANALYZE, BUFFERS) (its plan, per-node times and trigger times, as notices;
    it writes as the original does, but does not draw grants nor answer). auto_explain
    would do this without a copy, but the embedded PostgreSQL does not ship it. None if
    the source no longer has the expected shape."""
    source = source.replace(
        "FUNCTION public.tally_record_usage(", "FUNCTION public.tally_record_usage_profiled("
    )
    writes_end = _WRITES_END.search(source)
    if "    WITH new AS (" not in source or writes_end is None:
        return None
    start = source.index("    WITH new AS (")
    end, after = writes_end.span()
    writes = source[start:end] + writes_end.group(1)
    names = [*_VARIABLES, *(v for v in ("v_new_accounts",) if v in writes)]
    for n, name in enumerate(names, 1):
        writes = re.sub(rf"\b{name}\b", f"${n}", writes)
    explained = (
        "FOR v_slow IN EXECUTE 'EXPLAIN (ANALYZE, BUFFERS) "
        + writes.replace("'", "''")
        + "' USING "
        + ", ".join(names)
        + " LOOP RAISE NOTICE '%', v_slow; END LOOP;"
    )
    source = source[:start] + explained + source[after:]
    source = source.replace("DECLARE\n", "DECLARE\n    t0 timestamptz := clock_timestamp();\n", 1)
    for step in (s for s in _STEPS if s in source):
        label = step.strip()[:40].replace("'", " ").replace("%", " ")
        source = source.replace(
            step,
            f"    RAISE NOTICE '% ms: {label}',\n"
            "        1000 * extract(epoch FROM clock_timestamp() - t0);\n" + step,
            1,
        )
    return source


async def explain(conn: asyncpg.Connection, caller: Caller, group: int) -> None:
    """One group through the profiled copy of the function, with track_functions."""
    source = await conn.fetchval("SELECT pg_get_functiondef('tally_record_usage'::regproc)")
    copy = profiled_copy(str(source))
    if copy is None:
        print("usage_sql: tally_record_usage changed shape; --explain needs updating")
        return
    await conn.execute(copy)
    notices: list[str] = []

    def listen(_: Any, message: Any) -> None:
        notices.append(str(message.message))

    conn.add_log_listener(listen)
    profiled = RECORD.replace("tally_record_usage(", "tally_record_usage_profiled(")
    for _ in range(3):  # plans made and cached, as in a long-lived session
        payload = events(caller.walk(group), secrets.token_hex(6), group)
        await conn.fetchval(profiled, payload, CALLER, timeout=TIMEOUT)
    notices.clear()
    await conn.execute("SET track_functions = 'all'")
    await conn.execute("SELECT pg_stat_reset()")
    payload = events(caller.walk(group), f"explain-{secrets.token_hex(4)}", group)
    await conn.fetchval(profiled, payload, CALLER, timeout=TIMEOUT)
    await asyncio.sleep(0.7)  # the statistics of the call reach the shared counters
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    functions = await conn.fetch(
        "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions "
        "ORDER BY total_time DESC"
    )
    conn.remove_log_listener(listen)
    print(f"\n===== one group of {group:,} events: statements and the plan of the writes =====")
    for notice in notices:
        print(notice)
    print(f"----- functions (track_functions = 'all'), one group of {group:,} -----")
    for f in functions:
        print(
            f"{f['funcname']:32} calls {f['calls']:6} total {f['total_time']:10.3f} ms "
            f"self {f['self_time']:10.3f} ms"
        )


async def run(url: str, args: argparse.Namespace) -> list[Sample]:
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    try:
        await conn.execute(setup_sql(args.accounts), timeout=TIMEOUT)
        caller = Caller(conn, args.accounts, args.spread)
        await caller.start()
        for group in args.groups:  # warm-up: pages in memory, tables not empty
            for _ in range(max(3, -(-WARM_UP_EVENTS // group))):
                await caller.call(group)
        # Statistics, as autovacuum keeps them on a live database; ANALYZE also makes every
        # cached plan be planned again. Without it the session's generic plans stay those
        # made on the empty tables of the first warm-up call, which may scan a table that
        # later grows (a call of 1 event measured 3 ms early in a run, 18-27 ms once
        # usage_events held 50,000 rows: a hash join over all of them).
        await conn.execute("ANALYZE", timeout=TIMEOUT)
        samples: list[Sample] = []
        for r in range(args.rounds):
            for group in args.groups:
                s = await caller.measure(group, args.seconds)
                samples.append(s)
                cpu = s.cpu_us()
                print(
                    f"usage_sql: round {r + 1} group {group:,}: {s.calls} calls, "
                    f"{s.events / s.wall_seconds:,.0f} events/s, wall {s.wall_us():.1f} µs/event, "
                    f"backend CPU {'n/a' if cpu is None else f'{cpu:.1f}'} µs/event",
                    flush=True,
                )
        if args.explain:
            for group in args.groups:
                await explain(conn, caller, group)
        return samples
    finally:
        await conn.close(timeout=30)


def _positive_ints(value: str) -> list[int]:
    levels = [int(part) for part in value.split(",") if part.strip()]
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("give positive integers, e.g. 100,1000")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.usage_sql", description=DESCRIPTION)
    parser.add_argument("--groups", type=_positive_ints, default=[1, 10, 100, 1000])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per group size")
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--explain", action="store_true", help="profile one call per size")
    parser.add_argument(
        "--spread",
        action="store_true",
        help="each call's events over consecutive accounts, one account per event (as "
        "unary RecordUsage calls grouped by the usage lane), instead of one account",
    )
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    with admin_url(args.database_url or None) as admin, fresh_database(admin) as url:
        samples = asyncio.run(run(url, args))
    print("\n| group | calls | events/s | wall µs/event | backend CPU µs/event | µs/call |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for group in args.groups:
        mine = [s for s in samples if s.group == group]
        calls = sum(s.calls for s in mine)
        n = sum(s.events for s in mine)
        wall = sum(s.wall_seconds for s in mine)
        cpus = [s.backend_cpu_seconds for s in mine]
        cpu = per_call = "n/a"
        if all(c is not None for c in cpus):
            total = sum(c for c in cpus if c is not None)
            cpu, per_call = f"{total / n * 1e6:.1f}", f"{total / calls * 1e6:.0f}"
        print(
            f"| {group:,} | {calls} | {n / wall:,.0f} | {wall / n * 1e6:.1f} | {cpu} | {per_call} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
