"""The large account of ``bench.metering``: millions of usage events loaded with COPY
straight into ``usage_events``, the matching 15-minute ``usage_rollups`` built with one
``INSERT ... SELECT ... GROUP BY``, and the direct SQL that checks GetUsage.

Event ``i`` of ``n`` starts at ``start + i * (end - start) / n`` (microseconds, so a
range's row count is known in advance), cycles through a few products and endpoints,
and has mixed outcomes: about 90% COMPLETED and successful, 7% COMPLETED with
``success = false`` (status 422), 3% FAILED (status 500). Every event is uncharged
(``credits = 0``, ``entry_id`` NULL, as the table's CHECK requires without a ledger
entry), so the load needs no ledger rows.

The rows are generated in chunks (memory stays bounded) and sent by ``COPY ... FROM
STDIN (FORMAT binary)`` (asyncpg's ``copy_records_to_table``) over a few connections.
When the database role may, the loading sessions set ``session_replication_role =
replica``, which skips the table's row triggers (the two foreign-key checks and the
credit-type trigger, a no-op for uncharged events) as a bulk load usually does; the
indexes are maintained either way.
"""

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from bench.probe import plain_url
from tally_service import reads

# (product, endpoint) of event i is MIX[i % len(MIX)].
MIX = (
    ("PAN-Plus", "/v1/pan/verify"),
    ("PAN-Plus", "/v1/pan/verify"),
    ("PAN-Plus", "/v2/pan/verify"),
    ("PAN-Plus", "/v2/pan/verify"),
    ("PAN-Plus", "/v1/pan/verify"),
    ("PAN-Basic", "/v1/pan/basic"),
    ("PAN-Basic", "/v1/pan/basic"),
    ("GST-Verify", "/v1/gst/verify"),
    ("OCR-Aadhaar", "/v1/ocr/aadhaar"),
    ("OCR-Aadhaar", "/v1/ocr/aadhaar/masked"),
)
PRODUCTS = tuple(sorted({product for product, _ in MIX}))
COLUMNS = (
    "account_id",
    "event_id",
    "product_id",
    "endpoint",
    "status",
    "success",
    "status_code",
    "message",
    "quantity",
    "credits",
    "started_at",
    "completed_at",
    "processing_time_ms",
    "fingerprint",
    "finish_fingerprint",
)
# The payload fingerprint is a SHA-256 in production; its value is never read here.
FINGERPRINT = bytes(32)
CHUNK_ROWS = 50_000
LOAD_CONNECTIONS = 2
QUERY_TIMEOUT_SECONDS = 900.0

_ROLL_UP = """
INSERT INTO usage_rollups (account_id, bucket_start, product_id, endpoint, requests,
                           successful, failed, credits, quantity)
SELECT account_id, date_bin('15 minutes', started_at, timestamptz '2000-01-01 00:00:00+00'),
       product_id, endpoint, count(*), count(*) FILTER (WHERE success),
       count(*) FILTER (WHERE NOT success), sum(credits), sum(quantity)
FROM usage_events
WHERE account_id = $1 AND status IN ('completed', 'failed')
GROUP BY 1, 2, 3, 4
"""
_ACCOUNT_TOTALS = """
UPDATE accounts
SET usage_requests = usage_requests + $2,
    last_activity_at = greatest(last_activity_at, clock_timestamp())
WHERE account_id = $1
"""
# The rows of ExportUsageReport as tally_service.reads selects them: the export's query
# as it runs (through a cursor, with $n
# parameters, after EXPORT_SETTINGS), with named parameters for explain().
EXPORT_QUERY = (
    reads._EXPORT_ROWS.format(product="")
    .replace("$1", ":account_id")
    .replace("$2", ":start")
    .replace("$3", ":end")
)
EXPORT_SETTINGS = ("SET LOCAL enable_sort = off",)
_SIZES = """
SELECT c.relname, pg_relation_size(c.oid) AS bytes
FROM pg_class c
WHERE c.relname IN ('usage_events', 'usage_rollups')
   OR c.oid IN (SELECT indexrelid FROM pg_index
                WHERE indrelid IN ('usage_events'::regclass, 'usage_rollups'::regclass))
ORDER BY 2 DESC
"""


@dataclass(frozen=True)
class Dataset:
    account_id: str
    events: int
    start: datetime  # inclusive, UTC
    end: datetime  # exclusive, UTC

    def started_at(self, i: int) -> datetime:
        span = (self.end - self.start) // timedelta(microseconds=1)
        return self.start + timedelta(microseconds=i * span // self.events)

    def first_index_at(self, instant: datetime) -> int:
        """The first event that starts at or after ``instant``."""
        lo, hi = 0, self.events
        while lo < hi:
            mid = (lo + hi) // 2
            if self.started_at(mid) < instant:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def row(self, i: int) -> tuple[Any, ...]:
        product, endpoint = MIX[i % len(MIX)]
        started = self.started_at(i)
        ms = 40 + (i * 37) % 1200
        outcome = i % 97
        if outcome < 87:
            status, success, code, message = "completed", True, 200, ""
        elif outcome < 94:
            status, success, code, message = "completed", False, 422, "Invalid Pan Number."
        else:
            status, success, code, message = "failed", False, 500, "Upstream timeout"
        return (
            self.account_id,
            f"ev-{i:010d}",
            product,
            endpoint,
            status,
            success,
            code,
            message,
            1,
            0,
            started,
            started + timedelta(milliseconds=ms),
            ms,
            FINGERPRINT,
            FINGERPRINT,
        )


@dataclass
class LoadResult:
    rows: int
    connections: int
    triggers_skipped: bool
    copy_seconds: float
    rollup_rows: int
    rollup_seconds: float
    vacuum_seconds: float
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.copy_seconds if self.copy_seconds > 0 else 0.0


async def _connect(url: str) -> Any:
    return await asyncpg.connect(
        plain_url(url),
        timeout=30,
        command_timeout=QUERY_TIMEOUT_SECONDS,
        server_settings={"application_name": "bench-metering-load", "jit": "off"},
    )


async def _skip_triggers(conn: Any) -> bool:
    try:
        await conn.execute("SET session_replication_role = replica")
    except asyncpg.PostgresError:
        return False
    return True


async def _copy(url: str, data: Dataset, worker: int, workers: int, progress: Any) -> bool:
    conn = await _connect(url)
    try:
        skipped = await _skip_triggers(conn)
        for first in range(worker * CHUNK_ROWS, data.events, workers * CHUNK_ROWS):
            rows = [data.row(i) for i in range(first, min(data.events, first + CHUNK_ROWS))]
            await conn.copy_records_to_table("usage_events", records=rows, columns=COLUMNS)
            progress(len(rows))
            # Let the other connections' coroutines generate their next chunk.
            await asyncio.sleep(0)
        return skipped
    finally:
        await conn.close(timeout=30)


async def _load(url: str, data: Dataset, log: Any) -> LoadResult:
    done = 0
    last_report = time.monotonic()
    started = time.monotonic()

    def progress(n: int) -> None:
        nonlocal done, last_report
        done += n
        if time.monotonic() - last_report >= 30:
            last_report = time.monotonic()
            rate = done / (last_report - started)
            log(f"COPY {done:,}/{data.events:,} rows ({rate:,.0f} rows/s)")

    skipped = await asyncio.gather(
        *(_copy(url, data, w, LOAD_CONNECTIONS, progress) for w in range(LOAD_CONNECTIONS))
    )
    copy_seconds = time.monotonic() - started
    log(f"COPY done: {data.events:,} rows in {copy_seconds:.1f}s")

    conn = await _connect(url)
    try:
        await conn.execute("SET work_mem = '256MB'")
        t = time.monotonic()
        async with conn.transaction():
            status = await conn.execute(_ROLL_UP, data.account_id)
            await conn.execute(_ACCOUNT_TOTALS, data.account_id, data.events)
        rollup_rows = int(status.split()[-1])
        rollup_seconds = time.monotonic() - t
        log(f"rollups: {rollup_rows:,} rows in {rollup_seconds:.1f}s")
        t = time.monotonic()
        await conn.execute("VACUUM (ANALYZE) usage_events")
        await conn.execute("VACUUM (ANALYZE) usage_rollups")
        vacuum_seconds = time.monotonic() - t
        log(f"VACUUM (ANALYZE) in {vacuum_seconds:.1f}s")
        sizes = {str(r["relname"]): int(r["bytes"]) for r in await conn.fetch(_SIZES)}
    finally:
        await conn.close(timeout=30)
    return LoadResult(
        rows=data.events,
        connections=LOAD_CONNECTIONS,
        triggers_skipped=all(skipped),
        copy_seconds=copy_seconds,
        rollup_rows=rollup_rows,
        rollup_seconds=rollup_seconds,
        vacuum_seconds=vacuum_seconds,
        sizes=sizes,
    )


def load(url: str, data: Dataset, log: Any) -> LoadResult:
    """COPYs the events, builds their rollups, VACUUM (ANALYZE); the timings."""
    return asyncio.run(_load(url, data, log))


@dataclass(frozen=True)
class Counts:
    requests: int
    successful: int


def count(
    url: str, account_id: str, start: datetime, end: datetime, product_id: str = ""
) -> Counts:
    """Finished events of a range counted directly in ``usage_events``."""
    sql = (
        "SELECT count(*), count(*) FILTER (WHERE success) FROM usage_events "
        "WHERE account_id = $1 AND started_at >= $2 AND started_at < $3 "
        "AND status IN ('completed', 'failed')"
    )
    args: list[Any] = [account_id, start, end]
    if product_id:
        sql += " AND product_id = $4"
        args.append(product_id)

    async def run() -> Counts:
        conn = await _connect(url)
        try:
            row = await conn.fetchrow(sql, *args)
        finally:
            await conn.close(timeout=30)
        return Counts(int(row[0]), int(row[1]))

    return asyncio.run(run())


def explain(url: str, sql: str, params: dict[str, Any], settings: Sequence[str] = ()) -> list[str]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of a statement with SQLAlchemy-style ``:name``
    parameters (the text of tally_service.reads), as the server would run it."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from tally_service.db import async_url

    async def run() -> list[str]:
        engine = create_async_engine(
            async_url(url), connect_args={"server_settings": {"timezone": "UTC"}}
        )
        try:
            async with engine.connect() as conn:
                for setting in settings:  # SET LOCAL ..., in the same transaction
                    await conn.execute(text(setting))
                rows = await conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql), params)
                return [str(r[0]) for r in rows]
        finally:
            await engine.dispose()

    return asyncio.run(asyncio.wait_for(run(), QUERY_TIMEOUT_SECONDS))


def describe_sizes(sizes: dict[str, int]) -> Sequence[str]:
    return [f"{name} {size / 2**20:,.0f} MiB" for name, size in sizes.items()]


# -- where PostgreSQL spends its time: PL/pgSQL function statistics ------------------------

_FUNCTION_STATS = """
SELECT funcname, sum(calls)::bigint AS calls, sum(self_time) AS self_ms
FROM pg_stat_user_functions GROUP BY funcname
"""

FunctionStats = dict[str, tuple[int, float]]  # name -> (calls, self milliseconds)


def enable_function_stats(url: str) -> bool:
    """``track_functions = 'pl'`` for new sessions of this database (superuser only): the
    server's sessions then report the calls and time of every PL/pgSQL function."""

    async def run() -> bool:
        conn = await _connect(url)
        try:
            name = await conn.fetchval("SELECT current_database()")
            quoted = '"' + str(name).replace('"', '""') + '"'
            await conn.execute(f"ALTER DATABASE {quoted} SET track_functions = 'pl'")
        except asyncpg.PostgresError:
            return False
        finally:
            await conn.close(timeout=30)
        return True

    return asyncio.run(run())


def function_stats(url: str) -> FunctionStats:
    """The published totals (backends publish theirs within about a second of idling)."""

    async def run() -> FunctionStats:
        conn = await _connect(url)
        try:
            rows = await conn.fetch(_FUNCTION_STATS)
        finally:
            await conn.close(timeout=30)
        return {str(r["funcname"]): (int(r["calls"]), float(r["self_ms"])) for r in rows}

    return asyncio.run(run())


def function_delta(before: FunctionStats, after: FunctionStats) -> FunctionStats:
    out = {}
    for name, (calls, ms) in after.items():
        calls0, ms0 = before.get(name, (0, 0.0))
        if calls > calls0:
            out[name] = (calls - calls0, ms - ms0)
    return out
