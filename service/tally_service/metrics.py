"""Prometheus metrics: every definition, the interceptor that derives them, and /metrics.

All of Tally's metrics are defined here, on a ``CollectorRegistry`` passed in (the server
makes its own and serves it on TALLY_METRICS_ADDRESS; tests use a fresh one).

* RPC metrics follow go-grpc-prometheus: ``grpc_server_started_total``,
  ``grpc_server_handled_total`` and ``grpc_server_handling_seconds`` with the labels
  ``grpc_type``, ``grpc_service``, ``grpc_method`` (and ``grpc_code``, named as in Go:
  ``OK``, ``InvalidArgument``, ``FailedPrecondition``, ``Unavailable``, ...).
* Business metrics are derived centrally by :class:`MetricsInterceptor` from each RPC's
  response message (and, for errors, from the domain error the error-mapping interceptor
  answered with); no servicer knows about metrics. Replays of a stored response
  (idempotent retries, reported by ``Database.call``) and duplicate usage events are not
  counted again. StreamUsage answers only with counts, so its events are counted from the
  rows ``tally_record_usage`` returns for each group (``note_call``), as they are written;
  so are RecordUsageBatch's (the same counts as its response, summed per label set
  instead of read back from up to 1,000 result messages).
  Usage events are counted once, at their final status (completed or failed): RecordUsage
  and its batch and stream forms, CompleteUsage and FailUsage; StartUsage counts in
  ``tally_usage_jobs_started_total``.
* Expired holds are counted by the sweeper, which writes them down; a hold that a money
  movement on the same account expires in passing first is not counted (an undercount).
* Database metrics come from the SQLAlchemy pool (read at scrape time) and engine events.

No label holds an account id, an event id or any other per-customer value: the labels are
RPC names, codes, statuses, entry types, hold outcomes and product ids (a small catalog).

Credits in ``tally_credits_consumed_total`` are a float (decimal string -> ``Decimal`` ->
``float``, here at the metrics boundary only): good for rates and dashboards, NOT money.
The ledger is the only record of money.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import platform
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import metadata
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from tally.v1 import credits_pb2, ledger_pb2, metering_pb2
from tally_service import errors
from tally_service.handlers import Rewrapped, rewrap

log = logging.getLogger(__name__)

# RPCs take milliseconds; streams and exports up to minutes.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

HOLD_OUTCOMES = ("created", "captured", "released", "expired")
ENTRY_TYPES = ("credit", "debit", "adjustment")
# Outcomes of auto-reload intents; the auto-reload feature may add more. The
# TallyAutoReloadFailures alert counts outcome="failed".
AUTO_RELOAD_OUTCOMES = ("succeeded", "failed")
NOTIFICATION_OUTCOMES = ("delivered", "retry")

INSUFFICIENT_CREDITS = errors.InsufficientCredits.reason

_GO_CODE_NAMES = {grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled"}


def code_name(code: grpc.StatusCode) -> str:
    """The gRPC code as go-grpc-prometheus names it (``FAILED_PRECONDITION`` ->
    ``FailedPrecondition``)."""
    return _GO_CODE_NAMES.get(code) or "".join(p.capitalize() for p in code.name.split("_"))


def credits_value(text: str) -> float:
    """A decimal credit string as a float, for monitoring only (never money)."""
    if not text:
        return 0.0
    try:
        return float(Decimal(text))
    except InvalidOperation:
        return 0.0


def _micros_value(micros: Any) -> float:
    return float(Decimal(int(micros)).scaleb(-6)) if micros else 0.0


def _enum_labels(enum: Any, prefix: str) -> dict[int, str]:
    return {number: name.removeprefix(prefix).lower() for name, number in enum.items()}


_USAGE_STATUS_LABELS = _enum_labels(metering_pb2.UsageStatus, "USAGE_STATUS_")
_ENTRY_TYPE_LABELS = _enum_labels(ledger_pb2.EntryType, "ENTRY_TYPE_")


def usage_status_label(value: int) -> str:
    return _USAGE_STATUS_LABELS.get(value, "unknown")


def entry_type_label(value: int) -> str:
    return _ENTRY_TYPE_LABELS.get(value, "unknown")


def _version() -> str:
    try:
        return metadata.version("tally-metering-server")
    except metadata.PackageNotFoundError:
        return "unknown"


def new_registry() -> CollectorRegistry:
    """A registry of its own with the process, platform and GC collectors.

    Also turns off prometheus_client's ``*_created`` series (process-wide): they double the
    exposition and Prometheus does not use them."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class Metrics:
    """Every metric of Tally, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        rpc = ["grpc_type", "grpc_service", "grpc_method"]
        self.rpc_started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server.",
            rpc,
            registry=registry,
        )
        self.rpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            [*rpc, "grpc_code"],
            registry=registry,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status, in seconds.",
            rpc,
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.rpcs_shed = Counter(
            "tally_rpcs_shed_total",
            "RPCs refused unstarted with RESOURCE_EXHAUSTED because the process already ran "
            "TALLY_MAX_CONCURRENT_RPCS (also in grpc_server_handled_total as "
            "ResourceExhausted).",
            ["grpc_service", "grpc_method"],
            registry=registry,
        )
        self.usage_events = Counter(
            "tally_usage_events_total",
            "Usage events recorded or finished (not duplicates), by product and final status.",
            ["product", "status"],
            registry=registry,
        )
        self.usage_jobs_started = Counter(
            "tally_usage_jobs_started_total",
            "Long usage jobs started (StartUsage), by product.",
            ["product"],
            registry=registry,
        )
        self.credits_consumed = Counter(
            "tally_credits_consumed_total",
            "Credits charged for usage events, by product (a float for monitoring, not money).",
            ["product"],
            registry=registry,
        )
        self.ledger_entries = Counter(
            "tally_ledger_entries_total",
            "Ledger entries written, by type (credit, debit, adjustment).",
            ["type"],
            registry=registry,
        )
        self.holds = Counter(
            "tally_holds_total",
            "Holds (reservations) by outcome: created, captured, released, expired "
            "(expired: written down by the sweeper).",
            ["outcome"],
            registry=registry,
        )
        self.insufficient_credits = Counter(
            "tally_insufficient_credit_rejections_total",
            "Requests (or batch and stream items) refused for insufficient credits, by RPC.",
            ["method"],
            registry=registry,
        )
        self.auto_reload_intents = Counter(
            "tally_auto_reload_intents_total",
            "Auto-reload intents, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.notifications = Counter(
            "tally_notifications_total",
            "Threshold notification deliveries, by outcome (delivered; retry: the hook "
            "failed and the delivery is retried later).",
            ["outcome"],
            registry=registry,
        )
        self.db_up = Gauge(
            "tally_db_up",
            "1 while the database answers the health probe, else 0.",
            registry=registry,
        )
        self.db_query_seconds = Histogram(
            "tally_db_query_seconds",
            "Time of one database statement (cursor execute), in seconds.",
            buckets=QUERY_BUCKETS,
            registry=registry,
        )
        self.sweeper_last_success = Gauge(
            "tally_sweeper_last_success_timestamp_seconds",
            "Unix time of the sweeper's last pass without an error (0: none yet).",
            registry=registry,
        )
        self.reload_worker_last_success = Gauge(
            "tally_reload_worker_last_success_timestamp_seconds",
            "Unix time of the reload worker's last pass without an error (0: none yet).",
            registry=registry,
        )
        self.notification_worker_last_success = Gauge(
            "tally_notification_worker_last_success_timestamp_seconds",
            "Unix time of the notification worker's last pass without an error (0: none yet).",
            registry=registry,
        )
        self.build = Info("tally_build", "The running Tally build.", registry=registry)
        self.build.info({"version": _version(), "python_version": platform.python_version()})
        # The children of the fixed label values, created (at zero) once.
        self._holds = {outcome: self.holds.labels(outcome) for outcome in HOLD_OUTCOMES}
        self._entries = {t: self.ledger_entries.labels(t) for t in ENTRY_TYPES}
        for outcome in AUTO_RELOAD_OUTCOMES:
            self.auto_reload_intents.labels(outcome)
        for outcome in NOTIFICATION_OUTCOMES:
            self.notifications.labels(outcome)

    # -- RPCs -----------------------------------------------------------------------

    def initialize_rpcs(self, service_names: Iterable[str]) -> None:
        """Creates the series of every method of these services (full names) at zero,
        with code OK, so rates and ratios exist before the first call (as
        go-grpc-prometheus does)."""
        pool = descriptor_pool.Default()
        for name in service_names:
            service = pool.FindServiceByName(name)
            for method in service.methods:
                labels = (_rpc_type(method), service.full_name, method.name)
                self.rpc_started.labels(*labels)
                self.rpc_handled.labels(*labels, "OK")
                self.rpc_seconds.labels(*labels)
                self.rpcs_shed.labels(service.full_name, method.name)

    def shed(self, full_method: str) -> None:
        """One RPC refused by the concurrency limit (``ConcurrencyLimitInterceptor``)."""
        self.rpcs_shed.labels(*_split(full_method)).inc()

    # -- business events --------------------------------------------------------------

    def usage_event(self, product: str, status: str, credits: float) -> None:
        self.usage_events.labels(product, status).inc()
        self.credits_consumed.labels(product).inc(max(credits, 0.0))

    def ledger_entry(self, entry_type: str, count: int = 1) -> None:
        child = self._entries.get(entry_type)
        (child or self.ledger_entries.labels(entry_type)).inc(count)

    def hold(self, outcome: str, count: int = 1) -> None:
        if count > 0:
            (self._holds.get(outcome) or self.holds.labels(outcome)).inc(count)

    def rejected_for_credits(self, method: str, count: int = 1) -> None:
        if count > 0:
            self.insufficient_credits.labels(method).inc(count)

    def auto_reload_intent(self, outcome: str) -> None:
        self.auto_reload_intents.labels(outcome).inc()

    def set_db_up(self, up: bool) -> None:
        self.db_up.set(1 if up else 0)

    # -- the database -----------------------------------------------------------------

    def watch_engine(self, engine: AsyncEngine) -> None:
        """Statement timings (engine events) and the pool gauges (read at scrape time)."""
        sync_engine = engine.sync_engine
        started_key = "tally_metrics_started"
        histogram = self.db_query_seconds

        def before(conn: Connection, *_: Any) -> None:
            conn.info[started_key] = time.perf_counter()

        def after(conn: Connection, *_: Any) -> None:
            started = conn.info.pop(started_key, None)
            if started is not None:
                histogram.observe(time.perf_counter() - started)

        def failed(context: ExceptionContext) -> None:
            if context.connection is not None:
                after(context.connection)

        event.listen(sync_engine, "before_cursor_execute", before)
        event.listen(sync_engine, "after_cursor_execute", after)
        event.listen(sync_engine, "handle_error", failed)
        self.registry.register(PoolCollector(engine))


class PoolCollector(Collector):
    """``tally_db_pool_connections{state}``, ``tally_db_pool_size`` and
    ``tally_db_pool_waiting``, read from the SQLAlchemy pool at each scrape."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.pool = engine.sync_engine.pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool: Any = self.pool
        connections = GaugeMetricFamily(
            "tally_db_pool_connections",
            "Database connections of this process, by state (in_use, idle).",
            labels=["state"],
        )
        in_use = idle = size = waiting = 0
        try:
            in_use, idle, size = pool.checkedout(), pool.checkedin(), pool.size()
            waiting = _pool_waiters(pool)
        except (AttributeError, RuntimeError):  # another kind of pool
            pass
        connections.add_metric(["in_use"], in_use)
        connections.add_metric(["idle"], idle)
        yield connections
        yield GaugeMetricFamily(
            "tally_db_pool_size", "Configured database connections per process.", size
        )
        yield GaugeMetricFamily(
            "tally_db_pool_waiting",
            "Requests waiting for a database connection (the pool is exhausted).",
            waiting,
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


def _pool_waiters(pool: Any) -> int:
    """Waiters of an async queue pool: SQLAlchemy does not count them, so this reads the
    asyncio.Queue under AsyncAdaptedQueue (0 when that is not what the pool uses)."""
    queue = getattr(pool, "_pool", None)
    inner = vars(queue).get("_queue") if queue is not None else None
    getters = getattr(inner, "_getters", None)
    if getters is None:
        return 0
    return sum(1 for waiter in list(getters) if not waiter.done())


# -- what one RPC reports from inside ---------------------------------------------------


@dataclass
class RpcNotes:
    """Facts about the RPC in progress that its response does not show."""

    replayed: bool = False
    error: errors.DomainError | None = None
    on_call: Callable[[str, Any], None] | None = None


_current: contextvars.ContextVar[RpcNotes | None] = contextvars.ContextVar(
    "tally_rpc_notes", default=None
)


def note_call(function: str, response: Any, replayed: bool) -> None:
    """Called by ``Database.call`` for each money-function answer of the current RPC."""
    notes = _current.get()
    if notes is None:
        return
    notes.replayed = notes.replayed or replayed
    if notes.on_call is not None:
        notes.on_call(function, response)


def note_error(error: errors.DomainError) -> None:
    """Called by the error-mapping interceptor with the error it answers."""
    notes = _current.get()
    if notes is not None:
        notes.error = error


# -- the interceptor --------------------------------------------------------------------


def _rpc_type(method: descriptor.MethodDescriptor) -> str:
    if method.client_streaming:
        return "bidi_stream" if method.server_streaming else "client_stream"
    return "server_stream" if method.server_streaming else "unary"


def _split(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


# Counted from the rows `tally_record_usage` answers (`note_call`), group by group, not
# from the response: a stream answers only with counts, and a batch's rows tell the
# same as its response for a fraction of reading every result message back.
_COUNTED_BY_ROWS = frozenset(
    ("/tally.v1.MeteringService/StreamUsage", "/tally.v1.MeteringService/RecordUsageBatch")
)


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every RPC and derives the business metrics from its response.

    Put it FIRST (outermost) in the server's interceptors, before the error-mapping
    interceptor: it then sees the status that interceptor produced, and the domain error
    (``note_error``) behind it.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._rpcs: dict[tuple[str, str], _Rpc] = {}
        self._handlers = Rewrapped()

    def _rpc(self, rpc_type: str, full_method: str) -> _Rpc:
        rpc = self._rpcs.get((rpc_type, full_method))
        if rpc is None:
            service, method = _split(full_method)
            rpc = _Rpc(self.metrics, rpc_type, service, method, full_method)
            self._rpcs[(rpc_type, full_method)] = rpc
        return rpc

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        full_method: str = handler_call_details.method
        return self._handlers.get(full_method, handler) or self._handlers.put(
            full_method,
            handler,
            rewrap(
                handler,
                lambda behavior, kind: self._rpc(kind, full_method).wrap_unary(behavior),
                lambda behavior, kind: self._rpc(kind, full_method).wrap_stream(behavior),
            ),
        )


class _Rpc:
    """One method's labels and the wrappers that measure its calls."""

    def __init__(
        self, metrics: Metrics, rpc_type: str, service: str, method: str, full_method: str
    ) -> None:
        self.metrics = metrics
        self.method = method
        self.full_method = full_method
        labels = (rpc_type, service, method)
        self.labels = labels
        self.started = metrics.rpc_started.labels(*labels)
        self.seconds = metrics.rpc_seconds.labels(*labels)
        self.handled: dict[str, Any] = {}

    def _begin(self) -> RpcNotes:
        notes = RpcNotes()
        if self.full_method in _COUNTED_BY_ROWS:
            # Each group's results are counted as written (not from the response).
            notes.on_call = self._record_usage_results
        _current.set(notes)
        self.started.inc()
        return notes

    def _end(self, started: float, code: str, notes: RpcNotes) -> None:
        self.seconds.observe(time.perf_counter() - started)
        handled = self.handled.get(code)
        if handled is None:
            handled = self.handled[code] = self.metrics.rpc_handled.labels(*self.labels, code)
        handled.inc()
        error = notes.error
        if error is not None and error.reason == INSUFFICIENT_CREDITS:
            self.metrics.rejected_for_credits(self.method)

    @staticmethod
    def _code(exc: BaseException | None, context: grpc.aio.ServicerContext, notes: RpcNotes) -> str:
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return code_name(grpc.StatusCode.CANCELLED)
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code_name(code)
        if notes.error is not None:
            return code_name(notes.error.code)
        return "OK" if exc is None else code_name(grpc.StatusCode.UNKNOWN)

    def wrap_unary(self, behavior: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            notes = self._begin()
            started = time.perf_counter()
            failure: BaseException | None = None
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._end(started, self._code(failure, context, notes), notes)
            if not notes.replayed:
                self._observe(response)
            return response

        return wrapped

    def wrap_stream(self, behavior: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            notes = self._begin()
            started = time.perf_counter()
            failure: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._end(started, self._code(failure, context, notes), notes)

        return wrapped

    # -- business metrics from responses ------------------------------------------------

    def _observe(self, response: Any) -> None:
        try:
            _observe_response(self.metrics, self.method, response)
        except Exception:  # metrics must never fail an RPC
            log.exception("metrics: cannot observe the response of %s", self.full_method)

    def _record_usage_results(self, function: str, response: Any) -> None:
        if function != "tally_record_usage":
            return
        try:
            _observe_record_usage_rows(self.metrics, self.method, response)
        except Exception:
            log.exception("metrics: cannot observe the results of %s", self.full_method)


def _observe_entry(metrics: Metrics, entry: ledger_pb2.LedgerEntry) -> None:
    if entry.entry_id:
        metrics.ledger_entry(entry_type_label(entry.type))


def _observe_usage(metrics: Metrics, result: metering_pb2.RecordUsageResponse) -> None:
    if result.duplicate:
        return
    event = result.event
    metrics.usage_event(
        event.product_id, usage_status_label(event.status), credits_value(event.credits)
    )
    if result.HasField("entry"):
        _observe_entry(metrics, result.entry)


def _observe_finished(
    metrics: Metrics,
    response: metering_pb2.CompleteUsageResponse | metering_pb2.FailUsageResponse,
) -> None:
    event = response.event
    metrics.usage_event(
        event.product_id, usage_status_label(event.status), credits_value(event.credits)
    )
    if response.HasField("entry"):
        _observe_entry(metrics, response.entry)
        if response.entry.reservation_id:
            metrics.hold("captured")
    elif event.reservation_id:
        metrics.hold("released")


def _observe_started(metrics: Metrics, response: metering_pb2.StartUsageResponse) -> None:
    metrics.usage_jobs_started.labels(response.event.product_id).inc()
    if response.HasField("reservation"):
        metrics.hold("created")


def _observe_capture(metrics: Metrics, response: credits_pb2.CaptureResponse) -> None:
    metrics.hold("captured")
    _observe_entry(metrics, response.entry)


# What each response type tells; other responses (reads, catalog, accounts) tell nothing.
_OBSERVERS: dict[type, Callable[[Metrics, str, Any], None]] = {
    metering_pb2.RecordUsageResponse: lambda m, _, r: _observe_usage(m, r),
    metering_pb2.StartUsageResponse: lambda m, _, r: _observe_started(m, r),
    metering_pb2.CompleteUsageResponse: lambda m, _, r: _observe_finished(m, r),
    metering_pb2.FailUsageResponse: lambda m, _, r: _observe_finished(m, r),
    credits_pb2.ReserveResponse: lambda m, _, r: m.hold("created"),
    credits_pb2.CaptureResponse: lambda m, _, r: _observe_capture(m, r),
    credits_pb2.ReleaseResponse: lambda m, _, r: m.hold("released"),
    credits_pb2.DebitResponse: lambda m, _, r: _observe_entry(m, r.entry),
    credits_pb2.TopUpResponse: lambda m, _, r: _observe_entry(m, r.entry),
    credits_pb2.AdjustResponse: lambda m, _, r: _observe_entry(m, r.entry),
}


def _observe_response(metrics: Metrics, method: str, response: Any) -> None:
    """Counts what one successful, first-time (not replayed) response did."""
    observer = _OBSERVERS.get(type(response))
    if observer is not None:
        observer(metrics, method, response)


def _observe_record_usage_rows(metrics: Metrics, method: str, rows: Any) -> None:
    """Counts the rows ``tally_record_usage`` answered (a batch, a stream's group): the
    events written per (product, status) summed first, so a group costs one increment
    per label set, not one per event."""
    rejected = 0
    events: dict[tuple[str, str], list[int]] = {}
    entries = 0
    for row in rows:
        if isinstance(row, list):
            # An event written by this call: [index, of, duplicate, credits,
            # credit_type, created_at, entry_id, ..., product_id, status].
            if row[2]:
                continue
            key, micros = (row[10], row[11]), row[3]
            entries += bool(row[6])
        elif "error" in row:
            rejected += row["error"] == INSUFFICIENT_CREDITS
            continue
        elif row.get("duplicate"):
            continue
        else:
            event = row["event"]
            key, micros = (event["product_id"], event["status"]), event.get("credits")
            if row.get("entry"):
                metrics.ledger_entry(str(row["entry"]["entry_type"]))
        counted = events.get(key)
        if counted is None:
            events[key] = [1, int(micros or 0)]
        else:
            counted[0] += 1
            counted[1] += int(micros or 0)
    for (product, status), (count, micros) in events.items():
        metrics.usage_events.labels(str(product), str(status)).inc(count)
        metrics.credits_consumed.labels(str(product)).inc(max(_micros_value(micros), 0.0))
    if entries:
        metrics.ledger_entry("debit", entries)
    metrics.rejected_for_credits(method, rejected)


# -- /metrics ---------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """The /metrics HTTP endpoint on its own port (a thread of prometheus_client)."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, port = parse_address(address)
        self.httpd, self.thread = start_http_server(port, addr=host, registry=registry)
        self.address = address

    @property
    def port(self) -> int:
        port: int = self.httpd.server_address[1]
        return port

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
