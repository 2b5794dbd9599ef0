"""A no-op MeteringService on the same stack as the Tally server: the ceiling that
``bench.metering`` puts beside RecordUsage, RecordUsageBatch and StreamUsage.

    python -m bench.metering_noop --listen 127.0.0.1:PORT

The same ``grpc.aio`` server, options, interceptors (metrics, error mapping) and
frozen start-up objects as ``tally_service.server``, plus grpc.health.v1, but the
servicer neither validates nor touches a database: it reads every event and answers
one result per event, echoing the event as recorded (with the 0.001 credits the real
server would charge), so the request and response messages are about the size of the
real ones.
"""

import argparse
import asyncio
import gc
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from tally.v1 import metering_pb2, metering_pb2_grpc
from tally_service import metrics
from tally_service.interceptors import ErrorMappingInterceptor

CHARGE = "0.001"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the server's default TALLY_MAX_MESSAGE_BYTES


def _recorded(event: Any) -> metering_pb2.RecordUsageResponse:
    response = metering_pb2.RecordUsageResponse()
    response.event.CopyFrom(event)
    response.event.credits = CHARGE
    response.event.credit_type = metering_pb2.CREDIT_TYPE_PURCHASED
    return response


class NoopMetering(metering_pb2_grpc.MeteringServiceServicer):
    async def RecordUsage(
        self, request: metering_pb2.RecordUsageRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.RecordUsageResponse:
        return _recorded(request.event)

    async def RecordUsageBatch(
        self, request: metering_pb2.RecordUsageBatchRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.RecordUsageBatchResponse:
        response = metering_pb2.RecordUsageBatchResponse()
        for i, event in enumerate(request.events):
            result = response.results.add(index=i, event_id=event.event_id)
            result.result.CopyFrom(_recorded(event))
        return response

    async def StreamUsage(
        self,
        request_iterator: AsyncIterator[metering_pb2.StreamUsageRequest],
        context: grpc.aio.ServicerContext,
    ) -> metering_pb2.StreamUsageResponse:
        recorded = 0
        async for message in request_iterator:
            if message.event.event_id:
                recorded += 1
            recorded += sum(1 for event in message.events if event.event_id)
        return metering_pb2.StreamUsageResponse(recorded=recorded)


async def serve(listen: str) -> None:
    meters = metrics.Metrics(metrics.new_registry())
    server = grpc.aio.server(
        interceptors=[metrics.MetricsInterceptor(meters), ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=1000,
    )
    # Only the three recording methods: the others answer UNIMPLEMENTED.
    servicer = NoopMetering()  # type: ignore[abstract]
    metering_pb2_grpc.add_MeteringServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    print(f"metering no-op: serving on {listen}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metering_noop")
    parser.add_argument("--listen", required=True, help="host:port (loopback)")
    args = parser.parse_args(argv)
    # As tally_service.server.run does before serving: the same collector settings.
    gc.collect()
    gc.freeze()
    asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
