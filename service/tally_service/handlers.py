"""Rewrapping a gRPC method handler's behaviour, the one mechanism every interceptor
here (metrics, error mapping, authentication) uses."""

from collections.abc import Callable
from typing import Any

import grpc

# (behaviour, rpc type) -> wrapped behaviour; rpc type is "unary", "client_stream",
# "server_stream" or "bidi_stream".
Wrap = Callable[[Any, str], Any]


def rewrap(handler: grpc.RpcMethodHandler, wrap_unary: Wrap, wrap_stream: Wrap) -> Any:
    """The handler with its behaviour wrapped: `wrap_unary` for methods answering one
    message, `wrap_stream` for methods answering a stream."""
    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
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
