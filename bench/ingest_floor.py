"""The floor of durable, exactly-once ingestion in PostgreSQL, with no Tally in it.

    python -m bench.ingest_floor [--events N] [--per-transaction N] [--database-url URL]

What PostgreSQL alone spends per event on the least that acknowledging an event after
commit, exactly once, needs: one row per event holding its key (account_id, event_id)
under a primary key, written by COPY in transactions of ``--per-transaction`` rows with
durable commits. For comparison, the least any acknowledgement after commit needs: one
row per message of 100 events holding the message's bytes (10 messages a transaction),
which is what a design that acknowledges before it deduplicates and prices would write.
Reports the backend's CPU per event (from /proc through psutil) and the wall rate, on a
fresh database (the embedded pgserver unless a URL is given).

StreamUsage's target is set against its no-op twin, which uses the machine's cores to
read messages and count their events; this floor says what PostgreSQL would need per
event at that rate before Tally prices, charges or rolls up anything (docs/benchmarks.md,
issue 8, stop 20).
"""

import argparse
import asyncio
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.postgres import admin_url, fresh_database
from bench.probe import plain_url

DESCRIPTION = "PostgreSQL's CPU per event for the least that durable exactly-once ingestion needs."
ACCOUNTS = 200
EVENTS_PER_MESSAGE = 100
EVENT_BYTES = 100  # about the size of a serialized UsageEvent as the benchmarks send it
TABLES = """
CREATE TABLE floor_keys (account_id text, event_id text, PRIMARY KEY (account_id, event_id));
CREATE TABLE floor_messages (message_id bigserial PRIMARY KEY, body bytea);
ALTER TABLE floor_messages ALTER COLUMN body SET STORAGE EXTERNAL;
"""


def _cpu(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _measure(
    conn: asyncpg.Connection,
    process: Any,
    table: str,
    columns: list[str],
    rows: Callable[[], list[tuple[Any, ...]]],
    transactions: int,
    events_per_transaction: int,
) -> tuple[float, float]:
    """(backend CPU µs per event, events per second) over `transactions` COPYs."""
    for _ in range(20):  # warm-up
        async with conn.transaction():
            await conn.copy_records_to_table(table, records=rows(), columns=columns)
    cpu0, t0 = _cpu(process), time.perf_counter()
    for _ in range(transactions):
        async with conn.transaction():
            await conn.copy_records_to_table(table, records=rows(), columns=columns)
    cpu1, t1 = _cpu(process), time.perf_counter()
    events = transactions * events_per_transaction
    return (cpu1 - cpu0) / events * 1e6, events / (t1 - t0)


async def run(url: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    conn = await asyncpg.connect(plain_url(url), timeout=30)
    try:
        await conn.execute(TABLES)
        process = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
        per = args.per_transaction
        transactions = max(1, args.events // per)
        counter = iter(range(sys.maxsize))

        def keys() -> list[tuple[Any, ...]]:
            account = f"acct-{next(counter) % ACCOUNTS:04d}"
            return [(account, f"evt-{secrets.token_hex(16)}") for _ in range(per)]

        body = os.urandom(EVENT_BYTES) * EVENTS_PER_MESSAGE
        messages = max(1, per // EVENTS_PER_MESSAGE)

        def blobs() -> list[tuple[Any, ...]]:
            return [(body,) for _ in range(messages)]

        found = [
            (
                f"one row per event, its key under a primary key, {per:,} a transaction",
                *await _measure(
                    conn,
                    process,
                    "floor_keys",
                    ["account_id", "event_id"],
                    keys,
                    transactions,
                    per,
                ),
            ),
            (
                f"one row per message of {EVENTS_PER_MESSAGE} events (its bytes), "
                f"{messages} a transaction",
                *await _measure(
                    conn,
                    process,
                    "floor_messages",
                    ["body"],
                    blobs,
                    transactions,
                    messages * EVENTS_PER_MESSAGE,
                ),
            ),
        ]
        return found
    finally:
        await conn.close(timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_floor", description=DESCRIPTION)
    parser.add_argument("--events", type=int, default=300_000, help="events per measurement")
    parser.add_argument("--per-transaction", type=int, default=1_000, help="events a commit")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args(argv)
    if args.events < 1 or args.per_transaction < EVENTS_PER_MESSAGE:
        parser.error(f"--events >= 1 and --per-transaction >= {EVENTS_PER_MESSAGE}")
    with admin_url(args.database_url) as admin, fresh_database(admin) as url:
        found = asyncio.run(run(url, args))
    print("| what is written | PostgreSQL backend CPU µs/event | events/s (wall) |")
    print("| --- | ---: | ---: |")
    for label, cpu, rate in found:
        print(f"| {label} | {cpu:.2f} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
