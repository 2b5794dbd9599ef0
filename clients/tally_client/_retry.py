"""Retry policy shared by the sync and async clients.

gRPC retries ``UNAVAILABLE`` itself, by the service config the client gives its channel
(:mod:`tally_client._service_config`). The client's own loops are thin: they retry what a
service config cannot express (see there): ``DEADLINE_EXCEEDED`` with a fresh deadline per
attempt, ``StreamUsage`` from a replayable Sequence, and a report download that failed after
its first chunk (gRPC retries a stream only until the first response arrives).
"""

from __future__ import annotations

import random
from typing import Any

import grpc

#: Status codes worth retrying. Mutating calls resend the same ``request_id``,
#: so a retry after a lost response returns the first result instead of
#: repeating the movement.
RETRYABLE_CODES: frozenset[Any] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)
#: The codes the client's loops retry on calls that gRPC retries by the service config.
LOOP_RETRYABLE_CODES: frozenset[Any] = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})

BASE_DELAY_SECONDS = 0.05
MAX_DELAY_SECONDS = 2.0


def should_retry(
    e: grpc.RpcError, attempt: int, max_attempts: int, codes: frozenset[Any] = RETRYABLE_CODES
) -> bool:
    """Whether to try again after ``attempt`` (1-based) failed with ``e``."""
    if attempt >= max_attempts:
        return False
    code_fn = getattr(e, "code", None)
    try:
        code = code_fn() if callable(code_fn) else None
    except Exception:
        return False
    return code in codes


def backoff_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based).

    Exponential (50 ms, 100 ms, 200 ms, ... capped at 2 s) with "equal jitter":
    a uniformly random value between half the step and the full step. The same
    steps as the service config's ``initialBackoff``/``maxBackoff``.
    """
    step = min(MAX_DELAY_SECONDS, BASE_DELAY_SECONDS * 2.0 ** min(max(attempt - 1, 0), 16))
    return step / 2 + random.uniform(0, step / 2)
