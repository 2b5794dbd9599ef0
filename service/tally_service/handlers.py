"""Rewrapping a gRPC method handler's behaviour, the one mechanism every interceptor
here (metrics, error mapping, authentication) uses.

The innermost rewrap also makes the request deserializer total: bytes that are not the
request message (bad UTF-8 in a string field, a corrupt wire) would otherwise fail
inside gRPC, before any interceptor, and answer UNKNOWN. They become an `Undecodable`
request instead, which the behaviour refuses as INVALID_ARGUMENT (DESIGN.md 11), inside
every interceptor, so error mapping and metrics see it as any other refusal.
"""

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tally_service.errors import InvalidArgument

# (behaviour, rpc type) -> wrapped behaviour; rpc type is "unary", "client_stream",
# "server_stream" or "bidi_stream".
Wrap = Callable[[Any, str], Any]


class Undecodable:
    """A request whose bytes did not parse as the method's request message."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error

    def refuse(self) -> InvalidArgument:
        return InvalidArgument("request", f"not a valid request message: {self.error}")


def _total(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return Undecodable(error)

    deserialize.tally_total = True  # type: ignore[attr-defined]
    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.refuse()
        yield request


def _refusing(behavior: Any, client_streaming: bool, answers_stream: bool) -> Any:
    """The behaviour, refusing an undecodable request (or stream item) first."""
    if client_streaming:
        if answers_stream:

            async def each_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                async for response in behavior(_checked(requests), context):
                    yield response

            return each_stream

        async def each(requests: Any, context: Any) -> Any:
            return await behavior(_checked(requests), context)

        return each
    if answers_stream:

        async def one_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                raise request.refuse()
            async for response in behavior(request, context):
                yield response

        return one_stream

    async def one(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            raise request.refuse()
        return await behavior(request, context)

    return one


def rewrap(handler: grpc.RpcMethodHandler, wrap_unary: Wrap, wrap_stream: Wrap) -> Any:
    """The handler with its behaviour wrapped: `wrap_unary` for methods answering one
    message, `wrap_stream` for methods answering a stream."""
    deserializer = handler.request_deserializer
    innermost = deserializer is not None and not getattr(deserializer, "tally_total", False)
    kwargs: dict[str, Any] = {
        "request_deserializer": _total(deserializer) if innermost else deserializer,
        "response_serializer": handler.response_serializer,
    }
    if innermost:
        wrap_unary, wrap_stream = _inside(wrap_unary, handler), _inside(wrap_stream, handler)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary, "unary"), **kwargs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary, "client_stream"), **kwargs
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream, "server_stream"), **kwargs
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_stream(handler.stream_stream, "bidi_stream"), **kwargs
    )


def _inside(wrap: Wrap, handler: grpc.RpcMethodHandler) -> Wrap:
    """`wrap`, applied around the behaviour made to refuse undecodable requests."""

    def wrapped(behavior: Any, kind: str) -> Any:
        return wrap(
            _refusing(behavior, handler.request_streaming, handler.response_streaming), kind
        )

    return wrapped


class Rewrapped:
    """One interceptor's rewrapped handler of each method, made once: the handler a
    method resolves to is the same object call after call (the generic handlers' own;
    the inner interceptors' own from their caches), and the wrappers keep no state of
    a call, so rewrapping it on every call only cost time. A different handler (an
    interceptor inside that makes one per call) is rewrapped and replaces the entry."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, Any]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> Any:
        """The rewrapped handler made for this very `handler`, or None."""
        hit = self._by_method.get(method)
        return hit[1] if hit is not None and hit[0] is handler else None

    def put(self, method: str, handler: grpc.RpcMethodHandler, rewrapped: Any) -> Any:
        self._by_method[method] = (handler, rewrapped)
        return rewrapped
