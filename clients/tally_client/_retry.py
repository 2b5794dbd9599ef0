"""Retry policy shared by the sync and async clients."""

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

BASE_DELAY_SECONDS = 0.05
MAX_DELAY_SECONDS = 2.0


def should_retry(e: grpc.RpcError, attempt: int, max_attempts: int) -> bool:
    """Whether to try again after ``attempt`` (1-based) failed with ``e``."""
    if attempt >= max_attempts:
        return False
    code_fn = getattr(e, "code", None)
    try:
        code = code_fn() if callable(code_fn) else None
    except Exception:
        return False
    return code in RETRYABLE_CODES


def backoff_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based).

    Exponential (50 ms, 100 ms, 200 ms, ... capped at 2 s) with "equal jitter":
    a uniformly random value between half the step and the full step.
    """
    step = min(MAX_DELAY_SECONDS, BASE_DELAY_SECONDS * 2.0 ** min(max(attempt - 1, 0), 16))
    return step / 2 + random.uniform(0, step / 2)
