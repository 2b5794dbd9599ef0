"""The database: engine, the embedded default, migrations, and calls of the server-side
money functions with their errors mapped to domain errors."""

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.util import greenlet_spawn

from tally_service import errors, metrics, sqlfiles
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
    engine = create_async_engine(
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
    event.listen(engine.sync_engine.pool, "checkout", _discard_closed)
    return engine


def _discard_closed(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Never hands out a pooled connection the server has closed (a restart, a fast
    shutdown, a terminated backend): the pool replaces it with a new one. No round trip,
    unlike pre-ping: the driver already knows its socket is gone. Without this, each
    pooled connection failed one call after the database came back, and one cut in the
    middle of a statement could fail the next with asyncpg's "another operation is in
    progress" (INTERNAL)."""
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is not None and driver.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


def migrate(url: str) -> None:
    """Applies every migration, then the money SQL files if they changed (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("tally_service").joinpath("migrations"))
    )
    config.set_main_option("sqlalchemy.url", async_url(url).replace("%", "%%"))
    command.upgrade(config, "head")
    asyncio.run(_apply_sql_files(url))


async def _apply_sql_files(url: str) -> None:
    conn = await asyncpg.connect(_driver_url(url))
    try:
        if await sqlfiles.apply(conn):
            log.info("money SQL files applied (checksum %s)", sqlfiles.checksum()[:12])
    finally:
        await conn.close()


def _driver_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(("postgresql", *parts[1:]))


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


# PostgreSQL's message for a time zone name its time zone data lacks.
_UNKNOWN_ZONE = re.compile(r'time zone "(.*)" not recognized')


def unknown_zone(sqlstate: str, exc: BaseException) -> str | None:
    """The name in PostgreSQL's error for a time zone its data lacks (an account's
    zone stored before such names were refused), or None for any other error."""
    found = _UNKNOWN_ZONE.search(str(exc)) if sqlstate == "22023" else None
    return found[1] if found else None


def translate_state(sqlstate: str, raw_detail: str | None, exc: BaseException) -> Exception:
    """Maps a SQLSTATE (and the JSON detail of Tally's own TA errors) to a domain error
    (or to _LostRace, which calling again resolves)."""
    detail = _parse_detail(raw_detail)
    if sqlstate == "TA400":
        return errors.InvalidArgument(str(detail["field"]), str(detail["reason"]))
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
    if sqlstate == "TA423":
        return errors.ReservationOfUsageEvent(
            f"reservation {detail['reservation_id']} holds credit for usage event "
            f"{detail['event_id']!r}; finish it with CompleteUsage or FailUsage",
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
    if sqlstate == "TA429":
        return errors.TooManyThresholds(
            f"account {detail['account_id']!r} already has {detail['limit']} thresholds; "
            "delete one first",
            metadata={k: str(v) for k, v in detail.items()},
        )
    if (zone := unknown_zone(sqlstate, exc)) is not None:
        return errors.AccountTimeZoneUnknown(None, zone)
    if sqlstate == "22003":
        return errors.BalanceLimit("the movement would take the balance out of range")
    if sqlstate == "23505" and "idempotency_keys_pkey" in str(exc):
        return _LostRace()
    if sqlstate in ("40001", "40P01"):
        return _LostRace()
    if sqlstate == "57014":
        return errors.DatabaseUnavailable("the database statement timed out; retry")
    if sqlstate.startswith("53"):
        return errors.DatabaseUnavailable(
            "the database is out of resources (disk, memory or connections); retry"
        )
    if unavailable_state(sqlstate):
        return errors.DatabaseUnavailable("the database is unavailable; retry")
    log.error("unexpected database error %s", sqlstate, exc_info=exc)
    return errors.Internal("internal error")


# SQLSTATE classes and codes that say "not now" rather than "never": the same request can
# succeed later, so they are UNAVAILABLE (retryable), never INTERNAL.
#   08     connection exception
#   53     insufficient resources: 53100 disk_full, 53200 out_of_memory,
#          53300 too_many_connections, 53400 configuration_limit_exceeded (temp_file_limit)
#   57     operator intervention: 57014 query_canceled (statement_timeout), 57P01
#          admin_shutdown and 57P02 crash_shutdown (a connection cut by a stopping server),
#          57P03 cannot_connect_now (starting up or shutting down), 57P05 idle session
#   55P03  lock_not_available (lock_timeout)
_UNAVAILABLE_CLASSES = ("08", "53", "57")
_UNAVAILABLE_STATES = frozenset({"55P03"})


def unavailable_state(sqlstate: str) -> bool:
    """Whether a SQLSTATE means the database cannot serve now (retry later)."""
    return sqlstate[:2] in _UNAVAILABLE_CLASSES or sqlstate in _UNAVAILABLE_STATES


def is_unavailable(exc: BaseException) -> bool:
    """Whether an exception from any database path (driver, pool, SQLAlchemy, or the
    DatabaseUnavailable it was already mapped to) means the database is unreachable or
    cannot serve now: an outage to report once, not a bug to log with its traceback."""
    if isinstance(exc, errors.DatabaseUnavailable | PoolTimeout | OSError):
        return True  # OSError covers refused connections and connect timeouts
    if isinstance(exc, asyncpg.InterfaceError):
        return True  # e.g. ConnectionDoesNotExistError: the connection was lost
    if isinstance(exc, asyncpg.InternalClientError):
        # "cannot switch to state ...; another operation is in progress": a pooled
        # connection still consuming the FATAL error of a session the server terminated
        # (57P01) refuses the next statement before sending it, so nothing was done.
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return unavailable_state(exc.sqlstate or "")
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        if sqlstate:
            return unavailable_state(sqlstate)
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    return False


def describe(exc: BaseException) -> str:
    """One line naming an error (its driver cause when SQLAlchemy wraps it)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text_ = " ".join(str(cause).split()) or type(cause).__name__
    return f"{type(cause).__name__}: {text_}"[:300]


@dataclass(frozen=True)
class GroupSettings:
    """Group commit (`TALLY_GROUP_*`): how many movements one transaction may carry, how
    long the first may wait for company, and how many groups one process runs at once.
    With the default wait of 0 a group is whatever arrived while the previous groups
    were in the database, so a lone call is never delayed."""

    max_items: int = 64
    max_wait_seconds: float = 0.0
    concurrency: int = 1


# The movements that group commit carries (`tally_apply_group` dispatches them).
GROUPED = frozenset({"tally_move", "tally_reserve", "tally_capture", "tally_release"})


class UsageItem(NamedTuple):
    """One finished event as `tally_record_usage` takes it: a `tally_usage_event` record
    (migration 0016), whose attributes are these fields in this order; a group goes as
    one array of them, encoded by the driver in binary."""

    idx: int  # the event's index in the caller's call (results are keyed by it)
    account_id: str
    event_id: str
    product_id: str
    endpoint: str
    status: str
    success: bool
    status_code: int
    message: str
    quantity: int
    credits: int | None
    started_at: datetime
    completed_at: datetime | None
    processing_time_ms: int
    request_metadata: str  # JSON text
    result_metadata: str  # JSON text
    webhook_url: str
    fingerprint: bytes


@dataclass
class _Pending:
    function: str
    params: Mapping[str, Any]
    caller: str
    future: asyncio.Future[Any]
    key: Any = None  # items with equal non-None keys never share a group
    item: UsageItem | None = None  # the usage lane's event (params are then empty)

    @property
    def event(self) -> UsageItem:
        """The usage lane's event; every item that lane queues carries one."""
        if self.item is None:
            raise TypeError(f"{self.function}: a money call has no usage event")
        return self.item


class _GroupQueue:
    """A lane of group commit: callers' items queue; whenever one of `concurrency` slots
    is free, the items queued (up to `max_items`, after an optional wait) become one group
    that `apply` writes in one transaction and answers item by item."""

    def __init__(
        self,
        settings: GroupSettings,
        apply: Callable[[list[_Pending]], Coroutine[Any, Any, None]],
        *,
        one_caller: bool = False,
    ) -> None:
        self.settings = settings
        self.apply = apply
        self.one_caller = one_caller  # a group holds one caller's items only
        self.queue: list[_Pending] = []
        self.running = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, pending: _Pending) -> Any:
        self.queue.append(pending)
        self._start()
        return await pending.future

    def _start(self) -> None:
        while self.queue and self.running < self.settings.concurrency:
            self.running += 1
            task = asyncio.get_running_loop().create_task(self._run())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _take(self) -> list[_Pending]:
        group: list[_Pending] = []
        keys: set[Any] = set()
        rest: list[_Pending] = []
        for p in self.queue:
            if p.future.done():
                continue  # a caller that gave up before its group formed is not applied
            if (
                len(group) >= self.settings.max_items
                or (p.key is not None and p.key in keys)
                or (self.one_caller and group and p.caller != group[0].caller)
            ):
                rest.append(p)
                continue
            group.append(p)
            if p.key is not None:
                keys.add(p.key)
        self.queue = rest
        return group

    async def _run(self) -> None:
        try:
            if self.settings.max_wait_seconds > 0 and len(self.queue) < self.settings.max_items:
                await asyncio.sleep(self.settings.max_wait_seconds)
            group = self._take()
            if group:
                work = asyncio.ensure_future(self.apply(group))
                cancelled = False

                def abandon(_: object) -> None:
                    # Every caller gave up (deadline, cancellation): stop the statement,
                    # so a group nobody waits for rolls back, as a lone call would. Only
                    # once: a second cancellation would interrupt the first one's cleanup
                    # (the driver's cancel request, the connection's return to the pool).
                    nonlocal cancelled
                    if not cancelled and not work.done() and all(p.future.done() for p in group):
                        cancelled = True
                        work.cancel()

                for p in group:
                    p.future.add_done_callback(abandon)
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        finally:
            self.running -= 1
            if self.queue:
                self._start()


class Database:
    """The engine and the one gateway to the money functions (`call`)."""

    def __init__(self, engine: AsyncEngine, group: GroupSettings | None = None) -> None:
        self.engine = engine
        # One statement is one transaction (`_fetch`: asyncpg outside a transaction
        # block): the functions hold the account lock for their own work and the
        # commit, never across round trips.
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Set by the server to time the money functions (tally_db_query_seconds).
        self.observe_query: Callable[[float], None] | None = None
        self._statements: dict[tuple[str, tuple[str, ...]], str] = {}
        self.group = group or GroupSettings()
        self._movements = _GroupQueue(self.group, self._apply_group)
        self._usage = _GroupQueue(self.group, self._apply_usage_group, one_caller=True)

    def _statement(self, function: str, names: tuple[str, ...]) -> str:
        """`SELECT f(p_a => $1, p_b => $2, …)`: arguments by name, so no dict order can
        shift a value into another parameter. The caller is set for this statement's
        transaction before the function runs (a FROM item is evaluated first); ledger
        entries copy it (migration 0004)."""
        key = (function, names)
        statement = self._statements.get(key)
        if statement is None:
            _check_names(function, names)
            arguments = ", ".join(f"p_{n} => ${i}" for i, n in enumerate(names, 1))
            statement = (
                f"SELECT {function}({arguments}) "
                f"FROM (SELECT set_config('tally.caller', ${len(names) + 1}, true)) AS audit"
            )
            self._statements[key] = statement
        return statement

    async def _fetch(self, statement: str, args: list[Any]) -> Any:
        """Runs one statement (one transaction) on a pooled connection's driver (asyncpg)
        directly: the pool's connection itself (its checkout event, gauges and timeout
        as for any checkout), without SQLAlchemy's Connection around it, whose
        construction, isolation-level switch and close cost twice the rest of a call of
        the server's CPU. asyncpg outside a transaction block is autocommit, and its
        statement cache prepares each statement once per connection. Maps database
        errors."""
        try:
            fairy = await self.engine.raw_connection()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A checkout has no domain meaning: a pool timeout, a refused or failed
            # connect (raised as the driver's, the adapter's or SQLAlchemy's error).
            raise errors.DatabaseUnavailable("the database is unavailable; retry") from None
        try:
            driver = fairy.driver_connection
            assert driver is not None
            started = time.perf_counter()
            try:
                raw = await driver.fetchval(statement, *args)
            except (asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError, OSError):
                await greenlet_spawn(fairy.invalidate)
                raise
            if self.observe_query is not None:
                self.observe_query(time.perf_counter() - started)
        except asyncpg.PostgresError as exc:
            raise translate_state(exc.sqlstate or "", exc.detail, exc) from None
        except (
            OSError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,  # a connection still consuming a cut session
        ):
            raise errors.DatabaseUnavailable("the database is unavailable; retry") from None
        finally:
            # Back to the pool (in a greenlet: a pool that closes it, when disposed or
            # over its size, awaits the driver's close).
            await greenlet_spawn(fairy.close)
        return json.loads(raw) if isinstance(raw, str) else raw

    async def call(self, function: str, params: Mapping[str, Any]) -> tuple[Any, bool]:
        """Calls a money function with named arguments (`params` keys are its parameter
        names without `p_`); returns (response, replayed). Movements go through group
        commit: answered only after the transaction that carried them committed."""
        answer: tuple[Any, bool]
        if function in GROUPED and self.group.max_items > 1:
            _check_names(function, tuple(params))
            loop = asyncio.get_running_loop()
            pending = _Pending(function, params, current_caller.get(), loop.create_future())
            answer = await self._movements.submit(pending)
        else:
            answer = await self._call_alone(function, params, current_caller.get())
        # Here, in the caller's own context: a group's task runs in the context of the
        # call that started it, whose RPC notes are not the other callers'.
        metrics.note_call(function, answer[0], answer[1])
        return answer

    async def _call_alone(
        self, function: str, params: Mapping[str, Any], caller: str
    ) -> tuple[Any, bool]:
        statement = self._statement(function, tuple(params))
        args = [*params.values(), caller]
        for attempt in range(3):
            try:
                result = await self._fetch(statement, args)
            except _LostRace:
                if attempt < 2:
                    continue
                raise errors.DatabaseUnavailable("contention; retry") from None
            return _answer(function, result)
        raise AssertionError("unreachable")

    # -- group commit -------------------------------------------------------------

    async def _apply_group(self, group: list[_Pending]) -> None:
        if len(group) == 1:
            only = group[0]
            await _settle(only, self._call_alone(only.function, only.params, only.caller))
            return
        calls = json.dumps(
            [{"f": p.function, "caller": p.caller, "a": _json_arguments(p.params)} for p in group],
            separators=(",", ":"),
        )
        try:
            results = await self._fetch(_APPLY_GROUP, [calls])
        except errors.DatabaseUnavailable as exc:
            # Transient (timeout, connection): nothing was written; the callers retry.
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        except Exception:
            # Something one call raised (a same-key race with another process, an
            # overflow): nothing was written; each call runs again alone, so each
            # gets its own answer.
            for p in group:
                if not p.future.done():
                    await _settle(p, self._call_alone(p.function, p.params, p.caller))
            return
        for p, result in zip(group, results, strict=True):
            if p.future.done():
                continue
            try:
                p.future.set_result(_answer(p.function, result))
            except Exception as exc:
                p.future.set_exception(exc)

    async def record_usage(self, items: list[UsageItem]) -> list[Any]:
        """`tally_record_usage` over these items (the events of one call); one result per
        item. A call of one event (unary RecordUsage) joins the usage lane of group
        commit: concurrent calls' events are recorded by one call of the set-based
        function in one transaction, each answered with its own result."""
        if len(items) != 1 or self.group.max_items <= 1:
            results = await self._record_usage_now(items, current_caller.get())
        else:
            (item,) = items
            pending = _Pending(
                "tally_record_usage",
                {},
                current_caller.get(),
                asyncio.get_running_loop().create_future(),
                key=(item.account_id, item.event_id),
                item=item,
            )
            results = [await self._usage.submit(pending)]
        # In the caller's context, with its own results only (as in `call`).
        metrics.note_call("tally_record_usage", results, False)
        return results

    async def _record_usage_now(self, items: list[UsageItem], caller: str) -> list[Any]:
        answered, _ = await self._call_alone("tally_record_usage", {"events": items}, caller)
        results: list[Any] = answered
        return results

    async def _apply_usage_group(self, group: list[_Pending]) -> None:
        """One event per caller, distinct (account, event id) within the group: each event
        is renumbered to its position for the function and its result renumbered back to
        the caller's index. The lane groups one caller's events only (one transaction
        carries one `tally.caller` for the audit trail)."""
        if len(group) == 1:
            for p in group:
                await _settle(p, self._first_result(p))
            return
        items = [p.event._replace(idx=position) for position, p in enumerate(group)]
        try:
            results = await self._record_usage_now(items, group[0].caller)
        except errors.DatabaseUnavailable as exc:
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        except Exception:
            for p in group:  # one event's overflow or a race: each alone, own answer
                await _settle(p, self._first_result(p))
            return
        for result in results:
            if isinstance(result, list):
                p = group[result[0]]
                own = [p.event.idx, p.event.idx, *result[2:]]
                answer: Any = own
            else:
                p = group[int(result["index"])]
                answer = {**result, "index": p.event.idx}
            if not p.future.done():
                p.future.set_result(answer)

    async def _first_result(self, p: _Pending) -> Any:
        (result,) = await self._record_usage_now([p.event], p.caller)
        return result

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True


_APPLY_GROUP = "SELECT tally_apply_group(p_calls => $1::jsonb)"


class _Refused(Exception):
    """A refusal a money function returned (sql/15_refusals.sql)."""


def _answer(function: str, result: Mapping[str, Any]) -> tuple[Any, bool]:
    """A money function's answer: (response, replayed), or its refusal raised as the
    catalog's error."""
    refusal = result.get("error")
    if refusal is not None:
        error = translate_state(refusal["sqlstate"], refusal["detail"], _Refused(refusal))
        if isinstance(error, _LostRace):  # not a refusal any function returns
            raise errors.Internal("internal error")
        raise error
    return result["response"], bool(result["replayed"])


_CHECKED: set[tuple[str, tuple[str, ...]]] = set()  # the (function, names) found right


def _check_names(function: str, names: tuple[str, ...]) -> None:
    if (function, names) in _CHECKED:
        return
    expected = sqlfiles.signatures().get(function)
    if expected is None or set(expected) != {f"p_{n}" for n in names}:
        raise AssertionError(f"{function} takes {expected}, called with {sorted(names)}")
    _CHECKED.add((function, names))


def _json_arguments(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in params.items()}


async def _settle(pending: _Pending, outcome: Coroutine[Any, Any, Any]) -> None:
    try:
        result = await outcome
    except Exception as exc:
        if not pending.future.done():
            pending.future.set_exception(exc)
        return
    if not pending.future.done():
        pending.future.set_result(result)
