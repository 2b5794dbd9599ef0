"""The gRPC service config of the Tally services: the client's retry policy.

The policy is ``tally/v1/service_config.json``, kept with the protos
(``protos/tally/v1/``) and shipped as package data of ``tally.v1``, so callers in other
languages can use the same file. It retries ``UNAVAILABLE`` (the request never reached a
server, or the server is going away), with exponential backoff and jitter, for every method
but ``MeteringService.StreamUsage``. That is safe because every mutation carries its
idempotency key (``request_id``, or ``event_id`` for usage): a retry of a request that was
applied returns the first response. Its ``retryThrottling`` (10 tokens, each failure takes
one, each success gives back 0.1; retries stop below half) keeps a channel whose calls mostly
fail from multiplying the load on a struggling server. Calls fail fast (no ``waitForReady``).

Not retried by gRPC, and why:

* ``DEADLINE_EXCEEDED``: gRPC's deadline covers the whole call, retries included, so an
  expired deadline is final. The client keeps a thin loop that gives each attempt its own
  deadline (``timeout_seconds``), which the service config cannot express
  (``perAttemptRecvTimeout`` is experimental and off in grpcio).
* ``RESOURCE_EXHAUSTED``: the server's concurrency limit, or a message too large; more
  attempts would add load or fail the same way.
* ``StreamUsage``: gRPC would replay a client stream from its buffer (256 KiB at most), also
  for a one-shot iterator; the client retries it itself, only for a Sequence of events.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from typing import Any

#: gRPC caps ``maxAttempts`` at 5 (values above are treated as 5).
GRPC_MAX_ATTEMPTS = 5


@cache
def _shipped() -> dict[str, Any]:
    text = resources.files("tally.v1").joinpath("service_config.json").read_text("utf-8")
    config: dict[str, Any] = json.loads(text)
    return config


def service_config(max_attempts: int | None = None) -> dict[str, Any]:
    """The shipped service config; ``max_attempts`` replaces its ``maxAttempts`` (1: no
    retry policy at all)."""
    config = copy.deepcopy(_shipped())
    if max_attempts is None:
        return config
    for method in config.get("methodConfig", []):
        if "retryPolicy" not in method:
            continue
        if max_attempts <= 1:
            del method["retryPolicy"]
        else:
            method["retryPolicy"]["maxAttempts"] = min(max_attempts, GRPC_MAX_ATTEMPTS)
    return config


def service_config_json(max_attempts: int | None = None) -> str:
    """:func:`service_config` as the value of the ``grpc.service_config`` channel option,
    e.g. for a channel of your own: ``grpc.insecure_channel(target, options=[
    ("grpc.service_config", service_config_json())])``."""
    return json.dumps(service_config(max_attempts), separators=(",", ":"))
