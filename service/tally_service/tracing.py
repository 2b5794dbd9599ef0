"""OpenTelemetry tracing of the gRPC server and of the asyncpg driver, configured by the
standard OTEL_* variables.

Off unless asked: tracing starts only when ``OTEL_TRACES_EXPORTER`` names an exporter
(``otlp`` or ``console``, comma-separated; ``none`` is off) and ``OTEL_SDK_DISABLED`` is
not true. (The specification's default exporter is ``otlp``; here an unset variable means
no tracing, so a server without a collector does not try to send spans to one.)

Everything else is the SDK's own reading of the standard variables: ``OTEL_SERVICE_NAME``
and ``OTEL_RESOURCE_ATTRIBUTES`` (service.name defaults to ``tally``),
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (default parentbased_always_on: a
caller's sampled ``traceparent`` is followed), ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``.
The OTLP exporter (gRPC) is an optional dependency: ``pip install 'tally-metering-server[otlp]'``.

Spans: one SERVER span per RPC (health checks are not traced), and one CLIENT span per
asyncpg statement (``db.system`` postgresql) under it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from tally_service.config import ConfigError, parse_bool

EXPORTERS = ("otlp", "console", "none")


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = env.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol != "grpc":
        raise ConfigError(
            [
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: expected grpc "
                "(the OTLP exporter here is opentelemetry-exporter-otlp-proto-grpc)"
            ]
        )
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            [
                "OTEL_TRACES_EXPORTER=otlp needs the package opentelemetry-exporter-otlp-proto-grpc"
                " (pip install 'tally-metering-server[otlp]')"
            ]
        ) from None
    exporter: SpanExporter = OTLPSpanExporter()
    return exporter


def provider_from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A TracerProvider with the exporters OTEL_TRACES_EXPORTER names; None when tracing
    is off. Raises ConfigError (one line per problem) for values it cannot use."""
    env = os.environ if env is None else env
    disabled = env.get("OTEL_SDK_DISABLED", "").strip()
    if disabled:
        flag = parse_bool(disabled)
        if flag is None:
            raise ConfigError(
                [f"OTEL_SDK_DISABLED={disabled!r} is not valid: expected true or false"]
            )
        if flag:
            return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ConfigError(
            [
                f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']!r} is not valid: "
                f"expected a comma-separated list of {', '.join(EXPORTERS)}"
            ]
        )
    names = [n for n in names if n != "none"]
    if not names:
        return None
    exporters = [_exporter(name, env) for name in dict.fromkeys(names)]
    attributes: dict[str, Any] = {}
    for pair in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    attributes["service.name"] = (
        env.get("OTEL_SERVICE_NAME", "").strip() or attributes.get("service.name") or "tally"
    )
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """Instruments asyncpg (globally, while active) and makes the gRPC server interceptor."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        self.provider = provider
        self._asyncpg = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
        self._asyncpg.instrument(tracer_provider=provider, skip_dep_check=True)

    def server_interceptor(self) -> Any:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=filters.negate(filters.health_check())
        )

    def close(self) -> None:
        """Stops instrumenting, and sends the spans still buffered."""
        self._asyncpg.uninstrument()
        self.provider.force_flush()
