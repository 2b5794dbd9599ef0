"""The database: engine, the embedded default, migrations, and calls of the server-side
money functions with their errors mapped to domain errors."""

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from tally_service import errors, metrics
from tally_service.auth import current_caller
from tally_service.money import format_amount

log = logging.getLogger(__name__)


def async_url(url: str) -> str:
    """Normalises a PostgreSQL URL to the asyncpg driver."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        return urlunsplit(("postgresql+asyncpg", *parts[1:]))
    raise ValueError(f"not a PostgreSQL URL: scheme {parts.scheme!r}")


def start_embedded(data_dir: str) -> str:
    """Starts (or joins) an embedded PostgreSQL whose data lives in `data_dir`."""
    try:
        import pgserver
    except ImportError:  # an optional dependency since the distributions were split
        raise SystemExit(
            "tally: no TALLY_DATABASE_URL (--database-url) is set and the embedded PostgreSQL "
            "is not installed: set TALLY_DATABASE_URL, or install the 'embedded' extra "
            "(pip install 'tally-metering-server[embedded]')"
        ) from None

    path = os.path.abspath(os.path.join(data_dir, "pg"))
    os.makedirs(path, exist_ok=True)
    server = pgserver.get_server(  # type: ignore[attr-defined,unused-ignore]
        path, cleanup_mode="stop"
    )
    uri: str = server.get_uri()
    log.info("embedded PostgreSQL running in %s", path)
    return uri


def make_engine(url: str, *, pool_size: int = 10, statement_timeout_ms: int = 5000) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=10,
        connect_args={
            "server_settings": {
                "application_name": "tally",
                "timezone": "UTC",
                "statement_timeout": str(statement_timeout_ms),
            }
        },
    )


def migrate(url: str) -> None:
    """Applies every migration (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("tally_service").joinpath("migrations"))
    )
    config.set_main_option("sqlalchemy.url", async_url(url).replace("%", "%%"))
    command.upgrade(config, "head")


class _LostRace(Exception):
    """A concurrent request with the same key committed first; calling again replays it."""


def insufficient_credits(detail: Mapping[str, Any]) -> errors.InsufficientCredits:
    return errors.InsufficientCredits(
        f"available credit {format_amount(detail['available'])} cannot cover "
        f"{format_amount(detail['requested'])}",
        metadata={
            "account_id": str(detail["account_id"]),
            "available": format_amount(detail["available"]),
            "requested": format_amount(detail["requested"]),
            "overdraft_limit": format_amount(detail["overdraft_limit"]),
        },
    )


def _parse_detail(raw: str | None) -> dict[str, Any]:
    try:
        parsed: dict[str, Any] = json.loads(raw or "{}")
    except ValueError:
        return {}
    return parsed


def translate(exc: DBAPIError) -> Exception:
    """Maps a database error raised through SQLAlchemy to a domain error."""
    cause = exc.orig.__cause__ if exc.orig is not None else None
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    if not sqlstate and isinstance(exc, OperationalError | InterfaceError):
        return errors.DatabaseUnavailable("the database is unavailable; retry")
    return translate_state(sqlstate, getattr(cause, "detail", None), exc)


def translate_state(sqlstate: str, raw_detail: str | None, exc: BaseException) -> Exception:
    """Maps a SQLSTATE (and the JSON detail of Tally's own TA errors) to a domain error
    (or to _LostRace, which calling again resolves)."""
    detail = _parse_detail(raw_detail)
    if sqlstate == "TA404":
        return errors.NotFound(detail["resource"], str(detail["id"]))
    if sqlstate == "TA409":
        return errors.RequestIdReused(
            f"request_id {detail['request_id']!r} was already used for another "
            f"{'method' if detail['mismatch'] == 'method' else 'payload'}",
            metadata={k: str(v) for k, v in detail.items()},
        )
    if sqlstate == "TA410":
        return errors.AccountAlreadyExists(
            f"account {detail['id']!r} already exists", metadata={"account_id": detail["id"]}
        )
    if sqlstate == "TA402":
        return insufficient_credits(detail)
    if sqlstate == "TA412":
        return errors.ReservationNotPending(
            f"reservation {detail['reservation_id']} is {detail['status']}, not pending",
            metadata={k: str(v) for k, v in detail.items()},
        )
    if sqlstate == "TA422":
        return errors.CaptureExceedsHold(
            "amount",
            f"{format_amount(detail['requested'])} exceeds the held "
            f"{format_amount(detail['held'])}",
        )
    if sqlstate == "TA419":
        return errors.EventIdReused(
            f"event_id {detail['event_id']!r} was already recorded with another payload",
            metadata={k: str(v) for k, v in detail.items()},
        )
    if sqlstate == "TA413":
        return errors.EventNotPending(
            f"event {detail['event_id']!r} is already {detail['status']}",
            metadata={k: str(v) for k, v in detail.items()},
        )
    if sqlstate == "22003":
        return errors.BalanceLimit("the movement would take the balance out of range")
    if sqlstate == "23505" and "idempotency_keys_pkey" in str(exc):
        return _LostRace()
    if sqlstate in ("40001", "40P01"):
        return _LostRace()
    if sqlstate == "57014":
        return errors.DatabaseUnavailable("the database statement timed out; retry")
    if sqlstate.startswith("08"):
        return errors.DatabaseUnavailable("the database is unavailable; retry")
    log.error("unexpected database error %s", sqlstate, exc_info=exc)
    return errors.Internal("internal error")


class Database:
    """The engine plus one call per money function; one connection per call."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # One statement is one transaction: the functions hold the account lock for
        # their own work and the commit, never across round trips.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Set by the server to time the money functions (tally_db_query_seconds).
        self.observe_query: Callable[[float], None] | None = None
        self._statements: dict[tuple[str, int], str] = {}

    def _statement(self, function: str, arity: int) -> str:
        # The caller is set for this statement's transaction before the function runs
        # (a FROM item is evaluated first); ledger entries copy it (migration 0004).
        key = (function, arity)
        if key not in self._statements:
            arguments = ", ".join(f"${i}" for i in range(1, arity + 1))
            self._statements[key] = (
                f"SELECT {function}({arguments}) "
                f"FROM (SELECT set_config('tally.caller', ${arity + 1}, true)) AS audit"
            )
        return self._statements[key]

    async def call(self, function: str, params: Mapping[str, Any]) -> tuple[Any, bool]:
        """Calls a money function; returns (response, replayed).

        The hot path of every money movement: the pooled connection's driver (asyncpg)
        runs the one prepared statement directly, without SQLAlchemy's statement layer.
        """
        statement = self._statement(function, len(params))
        args = [*params.values(), current_caller.get()]
        for attempt in range(3):
            try:
                async with self._autocommit.connect() as conn:
                    driver = (await conn.get_raw_connection()).driver_connection
                    assert driver is not None
                    started = time.perf_counter()
                    try:
                        raw = await driver.fetchval(statement, *args)
                    except (asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError, OSError):
                        await conn.invalidate()
                        raise
                    if self.observe_query is not None:
                        self.observe_query(time.perf_counter() - started)
            except asyncpg.PostgresError as exc:
                error = translate_state(exc.sqlstate or "", exc.detail, exc)
                if isinstance(error, _LostRace) and attempt < 2:
                    continue
                if isinstance(error, _LostRace):
                    error = errors.DatabaseUnavailable("contention; retry")
                raise error from None
            except (PoolTimeout, OSError, asyncpg.InterfaceError, DBAPIError):
                raise errors.DatabaseUnavailable("the database is unavailable; retry") from None
            result: dict[str, Any] = json.loads(raw) if isinstance(raw, str) else raw
            replayed = bool(result["replayed"])
            metrics.note_call(function, result["response"], replayed)
            return result["response"], replayed
        raise AssertionError("unreachable")

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True
