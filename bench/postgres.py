"""PostgreSQL for the benchmark: the embedded pgserver in a temporary directory (or a
server given by URL), a fresh database per run, and a few facts about the server.

Mirrors the helpers of ``tests/conftest.py`` so that the benchmark does not import the
test suite.
"""

import asyncio
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tally_service.db import Database, async_url, make_engine, migrate
from tally_service.sweeper import analyze_new_tables

# Bounds every administrative statement (CREATE/DROP DATABASE, SHOW ...).
ADMIN_TIMEOUT_SECONDS = 60.0


@contextmanager
def admin_url(given: str | None) -> Iterator[str]:
    """The URL of a PostgreSQL server to create the benchmark database on.

    ``given``: use that server as is. Otherwise start the embedded pgserver in a
    temporary directory and stop it (and delete the directory) on exit.
    """
    if given:
        yield given
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="tally-bench-pg-") as directory:
        server = pgserver.get_server(directory, cleanup_mode="stop")  # type: ignore[attr-defined,unused-ignore]
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def _execute_autocommit(url: str, statement: str) -> None:
    engine = create_async_engine(async_url(url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


def _run_admin(url: str, statement: str) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(_execute_autocommit(url, statement), ADMIN_TIMEOUT_SECONDS)

    asyncio.run(bounded())


def analyze(url: str) -> list[str]:
    """ANALYZE every table of the benchmark database that holds data and has no
    statistics yet, as autovacuum does on a live database (a table once 50 rows changed,
    within a minute), and as the server's sweeper does past ten pages
    (`sweeper.analyze_new_tables`, here from one page); returns their names. Every
    session's cached plans are made again after it. Without it, the server's plans are
    those made on the empty tables of its first calls, for as long as a run lasts (an
    event looked up by (account, event id) through usage_events_by_product_time, reading
    the account's whole range). An empty table is left alone, as autovacuum leaves it:
    analysed empty, it would be planned as empty (a seq scan of holds by its primary key)
    until the next ANALYZE (docs/benchmarks.md, "Plans made on empty tables")."""

    async def bounded() -> list[str]:
        db = Database(make_engine(url, pool_size=1))
        try:
            return await asyncio.wait_for(analyze_new_tables(db, 1), ADMIN_TIMEOUT_SECONDS)
        finally:
            await db.engine.dispose()

    return asyncio.run(bounded())


@contextmanager
def fresh_database(admin: str, *, keep: bool = False) -> Iterator[str]:
    """Creates and migrates a database of its own; drops it on exit unless ``keep``."""
    name = f"tally_bench_{uuid.uuid4().hex[:12]}"
    _run_admin(admin, f'CREATE DATABASE "{name}"')
    try:
        url = with_database(admin, name)
        migrate(url)
        yield url
    finally:
        if not keep:
            _run_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class ServerFacts:
    version: str
    settings: dict[str, str]


FACT_SETTINGS = ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers")


def server_facts(url: str) -> ServerFacts:
    """``SELECT version()`` and the settings that bound a committing write."""

    async def read() -> ServerFacts:
        engine = create_async_engine(async_url(url))
        try:
            async with engine.connect() as conn:
                version = str((await conn.execute(text("SELECT version()"))).scalar_one())
                settings = {
                    name: str((await conn.execute(text(f"SHOW {name}"))).scalar_one())
                    for name in FACT_SETTINGS
                }
        finally:
            await engine.dispose()
        return ServerFacts(version, settings)

    async def bounded() -> ServerFacts:
        return await asyncio.wait_for(read(), ADMIN_TIMEOUT_SECONDS)

    return asyncio.run(bounded())
