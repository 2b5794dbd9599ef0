"""OpenTelemetry: one call to a real server (in this process, with the SDK's in-memory
exporter) makes a SERVER span and, under it, the CLIENT span of its database statement."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tally.v1 import accounts_pb2_grpc
from tally_client import _requests as rq
from tally_service import server
from tally_service.config import ConfigError, Settings
from tally_service.tracing import provider_from_env
from tests.conftest import free_port


def test_a_call_has_a_server_span_and_a_database_span(own_database_url: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    target = f"127.0.0.1:{free_port()}"
    settings = Settings.from_env({"TALLY_LISTEN_ADDRESS": target, "TALLY_METRICS_ADDRESS": ""})

    async def scenario() -> None:
        stop = asyncio.Event()
        serving = asyncio.create_task(
            server.serve(settings, own_database_url, stop=stop, tracer_provider=provider)
        )
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for _ in range(100):
                    try:
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.1)
                accounts = accounts_pb2_grpc.AccountsServiceStub(channel)
                await accounts.CreateAccount(
                    rq.create_account("traced", request_id="t-1").request,
                    timeout=10,
                )
        finally:
            stop.set()
            await serving

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    rpc = [s for s in spans if s.kind == SpanKind.SERVER]
    assert [s.name for s in rpc] == ["/tally.v1.AccountsService/CreateAccount"]  # no health
    server_span = rpc[0]
    assert server_span.attributes is not None
    assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    statements = [
        s
        for s in spans
        if s.kind == SpanKind.CLIENT
        and s.parent is not None
        and s.parent.span_id == server_span.context.span_id
    ]
    assert statements, [(s.name, s.kind, s.parent) for s in spans]
    statement = statements[0]
    assert statement.context.trace_id == server_span.context.trace_id
    assert statement.attributes is not None
    assert statement.attributes["db.system"] == "postgresql"
    assert "tally_create_account" in str(statement.attributes.get("db.statement"))


def test_tracing_is_off_unless_an_exporter_is_named() -> None:
    assert provider_from_env({}) is None
    assert provider_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert (
        provider_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None
    )
    provider = provider_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "x"})
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "x"
    provider.shutdown()
    provider = provider_from_env({"OTEL_TRACES_EXPORTER": "otlp"})
    assert provider is not None and provider.resource.attributes["service.name"] == "tally"
    provider.shutdown()
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER='jaeger' is not valid"):
        provider_from_env({"OTEL_TRACES_EXPORTER": "jaeger"})
