"""The gRPC server: services, health, reflection, the sweeper, and graceful shutdown."""

import asyncio
import contextlib
import logging
import signal

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
from tally_service import auth, metrics, reloads, sweeper
from tally_service.config import Settings
from tally_service.db import Database, describe, make_engine, migrate, start_embedded
from tally_service.interceptors import ConcurrencyLimitInterceptor, ErrorMappingInterceptor
from tally_service.outage import outage
from tally_service.servicers.accounts import AccountsServicer
from tally_service.servicers.credits import CreditsServicer
from tally_service.servicers.ledger import LedgerServicer
from tally_service.servicers.metering import MeteringServicer
from tally_service.tls import TlsFiles

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


def _start_metrics(address: str, meters: metrics.Metrics) -> metrics.MetricsServer | None:
    if not address:
        return None
    try:
        endpoint = metrics.MetricsServer(address, meters.registry)
    except (OSError, ValueError) as exc:
        if address != metrics.DEFAULT_ADDRESS:
            raise SystemExit(f"cannot serve metrics on {address}: {exc}") from None
        # Only the default may be taken (by another Tally, or a local Prometheus).
        log.warning("metrics disabled: cannot listen on %s: %s", address, exc)
        return None
    log.info("metrics on http://%s/metrics", address)
    return endpoint


async def serve(settings: Settings, database_url: str) -> None:
    db = Database(
        make_engine(
            database_url,
            pool_size=settings.db_pool_size,
            statement_timeout_ms=settings.db_statement_timeout_ms,
        )
    )
    meters = metrics.Metrics(metrics.new_registry())
    meters.watch_engine(db.engine)
    db.observe_query = meters.db_query_seconds.observe
    meters.initialize_rpcs(SERVICE_NAMES)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    callers = auth.load_callers()
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
    tls_files = TlsFiles.from_env()
    if tls_files is None:
        port = server.add_insecure_port(settings.listen_address)
    else:
        port = server.add_secure_port(settings.listen_address, tls_files.credentials())
        log.info(
            "TLS on%s", " with client certificates required" if tls_files.client_ca_file else ""
        )
    if port == 0:
        raise SystemExit(f"cannot listen on {settings.listen_address}")
    metrics_endpoint = _start_metrics(settings.metrics_address, meters)
    await server.start()
    log.info("tally listening on %s", settings.listen_address)
    print(f"tally: serving on {settings.listen_address}", flush=True)

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
    await stop.wait()
    log.info("stopping: draining in-flight RPCs for up to %ss", settings.shutdown_grace_seconds)
    await health.enter_graceful_shutdown()
    for task in background:
        task.cancel()
    for task in background:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await server.stop(settings.shutdown_grace_seconds)
    await db.engine.dispose()
    if metrics_endpoint is not None:
        metrics_endpoint.stop()
    log.info("stopped")


def run(settings: Settings) -> None:
    url = resolve_database_url(settings)
    if settings.migrate_on_start or not settings.database_url:
        migrate(url)
    asyncio.run(serve(settings, url))
