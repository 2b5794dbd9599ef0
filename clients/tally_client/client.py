"""Sync (:class:`TallyClient`) and async (:class:`AsyncTallyClient`) clients.

The client is written once, as :class:`AsyncTallyClient` (``_async_client.py``);
:class:`TallyClient` (``_sync_client.py``) is generated from it by
``scripts/unasync.py``. Both share the request builders of
:mod:`tally_client._requests` and the retry policy of :mod:`tally_client._retry`.

Behaviour common to every high-level method:

* each attempt has a deadline of ``timeout_seconds``;
* UNAVAILABLE is retried by gRPC itself, by the retry policy of the service config
  shipped with the protos (``tally/v1/service_config.json``, see
  :mod:`tally_client._service_config`), which the client passes as the
  ``grpc.service_config`` channel option with ``maxAttempts`` set to ``max_attempts``
  (gRPC allows at most 5); exponential backoff with jitter (50 ms, 100 ms, ... capped at
  2 s), within the attempt's deadline;
* DEADLINE_EXCEEDED is retried by the client with a new deadline, up to
  ``max_attempts`` attempts in total (the service config cannot give each attempt a
  deadline of its own);
* with ``channel=`` (a channel of your own), the client retries UNAVAILABLE itself as
  well, since that channel may have no retry policy;
* a mutating call gets ``request_id=str(uuid.uuid4())`` unless one is given, and
  every retry resends the same request id (so the server applies it once);
* any :class:`grpc.RpcError` is raised as a :class:`~tally_client.errors.TallyError`
  subclass (``raise ... from rpc_error``);
* amounts go through :func:`~tally_client.amounts.to_wire`, metadata mappings
  become ``google.protobuf.Struct``, datetimes must be timezone-aware.

Usage events are idempotent by ``event_id`` instead of ``request_id``: a retried
``record_usage``/``record_usage_batch`` resends the same events. The streaming
calls (``stream_usage``, ``export_usage_report``) have a deadline of
``stream_timeout_seconds`` (default: ``timeout_seconds * 60``) for the whole
stream; ``stream_usage`` is retried only when its events are a ``Sequence`` (a
list or tuple, which can be replayed), ``export_usage_report`` only before its
first chunk arrived, and ``export_usage_report_to`` rewrites the file from the
start.
"""

from __future__ import annotations

from ._async_client import AsyncStubs, AsyncTallyClient
from ._base import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_SECONDS,
    STREAM_TIMEOUT_FACTOR,
    ChannelOptions,
    Metadata,
)
from ._sync_client import Stubs, TallyClient

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT_SECONDS",
    "STREAM_TIMEOUT_FACTOR",
    "AsyncStubs",
    "AsyncTallyClient",
    "ChannelOptions",
    "Metadata",
    "Stubs",
    "TallyClient",
]
