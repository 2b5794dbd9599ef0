"""The gRPC server: services, health, reflection, the sweeper, and graceful shutdown."""

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from sqlalchemy import text

from tally.v1 import (
    accounts_pb2,
    accounts_pb2_grpc,
    credits_pb2,
    credits_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
)
from tally_service import auth, metrics, notifications, reloads, sweeper
from tally_service.config import ConfigError, Settings
from tally_service.db import (
    Database,
    GroupSettings,
    describe,
    make_engine,
    migrate,
    start_embedded,
)
from tally_service.interceptors import (
    AccessLogInterceptor,
    ConcurrencyLimitInterceptor,
    ErrorMappingInterceptor,
)
from tally_service.outage import outage
from tally_service.servicers.accounts import AccountsServicer
from tally_service.servicers.credits import CreditsServicer
from tally_service.servicers.ledger import LedgerServicer
from tally_service.servicers.metering import MeteringServicer
from tally_service.tls import TlsFiles
from tally_service.tracing import Tracing
from tally_service.tracing import provider_from_env as tracing_from_env

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    accounts_pb2.DESCRIPTOR.services_by_name["AccountsService"].full_name,
    credits_pb2.DESCRIPTOR.services_by_name["CreditsService"].full_name,
    ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,
    metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name,
]
# Liveness has a health name of its own, SERVING while the process answers at all (the
# event loop runs the health service): a database outage must not restart the pods. The
# readiness names ("" and each service) are SERVING only while the database answers.
LIVENESS = "liveness"
READINESS_NAMES = ["", *SERVICE_NAMES]
HEALTH_PROBE_SECONDS = 5.0
# While the database is down, probe more often, so readiness returns soon after it does.
HEALTH_PROBE_DOWN_SECONDS = 1.0
HEALTH_PROBE_TIMEOUT_SECONDS = 3.0


def resolve_database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    return start_embedded(settings.data_dir)


async def _probe(db: Database) -> BaseException | None:
    """None if the database answers a query within the probe timeout, else the error."""
    try:
        async with asyncio.timeout(HEALTH_PROBE_TIMEOUT_SECONDS):
            async with db.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not ready"
        return exc
    return None


async def _watch_database(
    db: Database, health: HealthServicer, meters: metrics.Metrics | None = None
) -> None:
    """Readiness names SERVING only while the database answers; also tally_db_up. Logs an
    outage once when it starts and once when it ends (``outage``)."""
    while True:
        error = await _probe(db)
        if error is None:
            outage.recovered()
        elif isinstance(error, TimeoutError):
            outage.failed(
                f"health probe: no answer in {HEALTH_PROBE_TIMEOUT_SECONDS} s "
                "(the database is slow, or every pooled connection is busy)"
            )
        else:
            outage.failed(f"health probe: {describe(error)}")
        if meters is not None:
            meters.set_db_up(error is None)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if error is None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in READINESS_NAMES:
            await health.set(name, status)
        await asyncio.sleep(HEALTH_PROBE_DOWN_SECONDS if outage.down else HEALTH_PROBE_SECONDS)


class StartupError(Exception):
    """The server cannot start (a port is taken, ...): one line for the operator."""


def check_bindable(address: str, what: str) -> None:
    """Raises StartupError when `address` (host:port) cannot be listened on: checked with
    a socket of our own before anything starts, so a taken port is one clear line (gRPC's
    own bind failure is a C-core log line plus a RuntimeError)."""
    host, port = metrics.parse_address(address)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise StartupError(f"cannot listen on {address} ({what}): {exc}") from None
    for family, kind, proto, _, sockaddr in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {address} ({what}): {exc.strerror or exc}"
                ) from None


def check_addresses(settings: Settings) -> None:
    """Every address the server will listen on can be bound (before the database starts)."""
    check_bindable(settings.listen_address, "TALLY_LISTEN_ADDRESS")
    if settings.metrics_address:
        check_bindable(settings.metrics_address, "TALLY_METRICS_ADDRESS")
    if settings.health_address:
        check_bindable(settings.health_address, "TALLY_HEALTH_ADDRESS")


def _start_metrics(address: str, meters: metrics.Metrics) -> metrics.MetricsServer | None:
    if not address:
        return None
    try:
        endpoint = metrics.MetricsServer(address, meters.registry)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise StartupError(
            f"cannot serve metrics on {address} (TALLY_METRICS_ADDRESS): {reason}"
        ) from None
    log.info("metrics on http://%s/metrics", address)
    return endpoint


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message sizes and connection management."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Ping idle connections; drop the ones that do not answer (a vanished client or
        # a middlebox that forgot the connection).
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        # What clients' own keepalive pings may do before the server answers GOAWAY
        # (too_many_pings): ping as often as this without data, and with no call open.
        ("grpc.http2.min_ping_interval_without_data_ms", settings.min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if settings.max_connection_age_ms > 0:
        # Long-lived HTTP/2 connections pin a client to the replicas it first reached; an
        # age limit (gRPC adds +-10% jitter) makes clients reconnect, behind a ClusterIP
        # Service to any replica, new ones included. In-flight calls get the grace period.
        options += [
            ("grpc.max_connection_age_ms", settings.max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_ms),
        ]
    return options


async def serve(
    settings: Settings,
    database_url: str,
    stop: asyncio.Event | None = None,
    tracer_provider: "TracerProvider | None" = None,
) -> None:
    """Serves until SIGTERM or SIGINT (or until `stop` is set, when given: then no
    signal handlers are installed); traces with `tracer_provider` when given."""
    tracing = Tracing(tracer_provider) if tracer_provider is not None else None
    db = Database(
        make_engine(
            database_url,
            pool_size=settings.db_pool_size,
            statement_timeout_ms=settings.db_statement_timeout_ms,
        ),
        GroupSettings(
            max_items=settings.group_max_items,
            max_wait_seconds=settings.group_max_wait_ms / 1000,
            concurrency=settings.group_concurrency,
        ),
    )
    meters = metrics.Metrics(metrics.new_registry())
    meters.watch_engine(db.engine)
    db.observe_query = meters.db_query_seconds.observe
    meters.initialize_rpcs(SERVICE_NAMES)
    options = grpc_options(settings)
    callers: dict[str, auth.Caller] | auth.TokenFile
    if settings.auth_tokens_file:
        # Followed as it changes; authentication stays on even while it lists nobody.
        callers = auth.TokenFile(settings.auth_tokens_file)
        if not callers.callers:
            log.warning("TALLY_AUTH_TOKENS_FILE lists no caller: every call is refused")
    else:
        callers = auth.load_callers(settings.auth_tokens, "")
        if not callers:
            log.warning("no TALLY_AUTH_TOKENS: every caller may call every method")
    interceptors: list[grpc.aio.ServerInterceptor] = [
        # Metrics first (outermost): it records the status the error mapping produced;
        # authentication inside the mapping, so its refusals are mapped like any error.
        metrics.MetricsInterceptor(meters),
        # The concurrency limit inside the metrics, so shed calls are counted.
        ConcurrencyLimitInterceptor(settings.max_concurrent_rpcs, meters.shed),
        ErrorMappingInterceptor(settings.max_call_seconds),
    ]
    if settings.access_log:
        interceptors.insert(0, AccessLogInterceptor())
    if tracing is not None:
        # Outermost: the span covers everything, and the caller's traceparent is its parent.
        interceptors.insert(0, tracing.server_interceptor())
    if callers:
        interceptors.append(auth.AuthInterceptor(callers))
    # No maximum_concurrent_rpcs: grpc's limit refuses before any interceptor, uncounted
    # (ConcurrencyLimitInterceptor keeps the limit instead).
    server = grpc.aio.server(interceptors=interceptors, options=options)
    accounts_pb2_grpc.add_AccountsServiceServicer_to_server(AccountsServicer(db), server)
    credits_pb2_grpc.add_CreditsServiceServicer_to_server(CreditsServicer(db), server)
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(LedgerServicer(db), server)
    metering_pb2_grpc.add_MeteringServiceServicer_to_server(MeteringServicer(db, settings), server)
    health = HealthServicer()
    for name in READINESS_NAMES:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    tls_files = TlsFiles.from_settings(settings)
    credentials = None
    if tls_files is not None:
        try:
            credentials = tls_files.credentials()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                [f"TALLY_TLS_CERT_FILE and TALLY_TLS_KEY_FILE cannot be used: {exc}"]
            ) from None
    try:
        if tls_files is None:
            port = server.add_insecure_port(settings.listen_address)
        else:
            port = server.add_secure_port(settings.listen_address, credentials)
            log.info(
                "TLS on%s",
                " with client certificates required" if tls_files.client_ca_file else "",
            )
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {settings.listen_address} (TALLY_LISTEN_ADDRESS)")
    health_server = None
    if settings.health_address:
        # Health alone, in plaintext, on a port of its own: Kubernetes' native gRPC probes
        # cannot speak TLS, and need no token.
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        try:
            health_port = health_server.add_insecure_port(settings.health_address)
        except RuntimeError:
            health_port = 0
        if health_port == 0:
            raise StartupError(f"cannot listen on {settings.health_address} (TALLY_HEALTH_ADDRESS)")
    metrics_endpoint = _start_metrics(settings.metrics_address, meters)
    await server.start()
    if health_server is not None:
        await health_server.start()
        log.info("health checks on %s (plaintext)", settings.health_address)
    log.info("tally listening on %s", settings.listen_address)
    if settings.log_format == "text":
        print(f"tally: serving on {settings.listen_address}", flush=True)

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    background = [
        asyncio.create_task(_watch_database(db, health, meters)),
        asyncio.create_task(sweeper.run(db, settings.sweep_interval_seconds, meters)),
        asyncio.create_task(
            reloads.ReloadWorker(db, reloads.make_hook(settings), settings, meters).run()
        ),
    ]
    if settings.notify_target:
        background.append(
            asyncio.create_task(notifications.NotificationWorker(db, settings, meters).run())
        )
    await stop.wait()
    log.info("stopping: draining in-flight RPCs for up to %ss", settings.shutdown_grace_seconds)
    await health.enter_graceful_shutdown()
    for task in background:
        task.cancel()
    for task in background:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await server.stop(settings.shutdown_grace_seconds)
    if health_server is not None:
        await health_server.stop(0)
    await db.engine.dispose()
    if metrics_endpoint is not None:
        metrics_endpoint.stop()
    if tracing is not None:
        tracing.close()
    log.info("stopped")


def run(settings: Settings) -> None:
    provider = tracing_from_env()  # checked first: a bad OTEL_* value stops the start
    url = resolve_database_url(settings)
    if settings.migrate_on_start or not settings.database_url:
        migrate(url)
    # What start-up made (modules, descriptors, migrations' leftovers collected first)
    # lives as long as the process: frozen, out of the collector's reach, so a full
    # collection walks only what was made since. Measured under load (hot Debit, 64 in
    # flight): each full collection paused every call for 30-39 ms (12 in a run), against
    # at most 2.3 ms frozen (docs/benchmarks.md, "Garbage collection").
    gc.collect()
    gc.freeze()
    try:
        asyncio.run(serve(settings, url, tracer_provider=provider))
    finally:
        if provider is not None:
            provider.shutdown()
