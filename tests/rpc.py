"""Raw calls of any Tally RPC by its descriptor, answering the status rather than raising:
what the robustness and fuzz tests need to see every status a request can get."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tally.v1 import (
    accounts_pb2,
    credits_pb2,
    funding_pb2,
    ledger_pb2,
    metering_pb2,
)

# Every service of the contract; a new service or RPC is covered by what iterates these.
FILES = (accounts_pb2, credits_pb2, ledger_pb2, metering_pb2, funding_pb2)
# Implemented by a payments backend, not by Tally: Tally answers UNIMPLEMENTED.
NOT_SERVED = {"tally.v1.FundingService"}


def services() -> list[descriptor.ServiceDescriptor]:
    return [s for f in FILES for s in f.DESCRIPTOR.services_by_name.values()]


def methods() -> list[descriptor.MethodDescriptor]:
    return [m for s in services() for m in s.methods]


def method(name: str) -> descriptor.MethodDescriptor:
    (found,) = [m for m in methods() if m.name == name]
    return found


def message_class(d: descriptor.Descriptor) -> type[message.Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(d)


@dataclass
class Outcome:
    code: grpc.StatusCode
    responses: list[Any]
    status: status_pb2.Status | None = None
    details: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.code == grpc.StatusCode.OK)

    @property
    def response(self) -> Any:
        return self.responses[0] if self.responses else None

    def fields(self) -> list[str]:
        """The fields named by the status's BadRequest."""
        named: list[str] = []
        if self.status is None:
            return named
        for detail in self.status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                named.extend(v.field for v in bad.field_violations)
        return named

    def size(self) -> int:
        return len(self.details) + (self.status.ByteSize() if self.status else 0)


def invoke(
    channel: grpc.Channel, m: descriptor.MethodDescriptor, request: Any, timeout: float = 20
) -> Outcome:
    """Calls the method (a list of requests for a client stream); never raises RpcError."""
    path = f"/{m.containing_service.full_name}/{m.name}"
    response_class = message_class(m.output_type)
    kwargs: dict[str, Any] = {
        "request_serializer": lambda r: r.SerializeToString(),
        "response_deserializer": response_class.FromString,
    }
    try:
        if m.client_streaming:
            requests = request if isinstance(request, list) else [request]
            one = channel.stream_unary(path, **kwargs)(iter(requests), timeout=timeout)
            return Outcome(grpc.StatusCode.OK, [one])
        if m.server_streaming:
            stream: Iterator[Any] = channel.unary_stream(path, **kwargs)(request, timeout=timeout)
            return Outcome(grpc.StatusCode.OK, list(stream))
        answer = channel.unary_unary(path, **kwargs)(request, timeout=timeout)
        return Outcome(grpc.StatusCode.OK, [answer])
    except grpc.RpcError as error:
        call: Any = error
        status = None
        try:
            status = rpc_status.from_call(call)
        except ValueError:
            status = None
        return Outcome(call.code(), [], status, call.details() or "")
