"""The one layer that turns exceptions into gRPC statuses.

Domain errors carry their code and ErrorInfo; database errors are translated first;
anything else is logged with its traceback and answered INTERNAL (never UNKNOWN, and
never a traceback on the wire).
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from sqlalchemy.exc import DBAPIError

from tally_service import errors, metrics
from tally_service.auth import current_caller
from tally_service.db import translate
from tally_service.handlers import Rewrapped, rewrap
from tally_service.outage import outage

log = logging.getLogger(__name__)


def _as_domain_error(exc: BaseException, method: str) -> errors.DomainError:
    if isinstance(exc, errors.DomainError):
        return exc
    if isinstance(exc, DBAPIError):
        translated = translate(exc)
        if isinstance(translated, errors.DomainError):
            return translated
    if isinstance(exc, OSError | TimeoutError):
        return errors.DatabaseUnavailable("a dependency is unavailable; retry")
    if outage.absorb(exc, method):  # logs an outage once, not each call's traceback
        return errors.DatabaseUnavailable("the database is unavailable; retry")
    log.error("unhandled error in %s", method, exc_info=exc)
    return errors.Internal("internal error")


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    error = _as_domain_error(exc, method)
    metrics.note_error(error)
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps errors to statuses, and bounds each unary call's handling time (a limit of
    the server's own, whatever deadline the caller set)."""

    def __init__(self, max_call_seconds: float = 30.0) -> None:
        self.max_call_seconds = max_call_seconds
        self._handlers = Rewrapped()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        return self._handlers.get(method, handler) or self._handlers.put(
            method,
            handler,
            rewrap(
                handler,
                lambda behavior, kind: _wrap_unary(
                    behavior, method, self.max_call_seconds if kind == "unary" else None
                ),
                lambda behavior, _: _wrap_stream(behavior, method),
            ),
        )


def _wrap_unary(behavior: Any, method: str, limit_seconds: float | None) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        limit = asyncio.timeout(limit_seconds)
        try:
            async with limit:
                return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except TimeoutError as exc:
            # Work cancelled mid-way leaves no trace (one statement is one transaction);
            # work that committed is found again by a retry with the same key.
            error: BaseException = exc
            if limit.expired():
                error = errors.CallTimeout(f"the call took longer than {limit_seconds} s")
            await _abort(context, error, method)
        except Exception as exc:
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(behavior: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return wrapped


access_log = logging.getLogger("tally.access")


def _status_name(exc: BaseException | None, context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        code = grpc.StatusCode.CANCELLED
    elif not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
    return str(code.name)


class AccessLogInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """One log line per RPC (logger ``tally.access``, TALLY_ACCESS_LOG): method, code,
    duration_ms, caller (the token's caller name; empty without authentication) and peer.

    Put it first (outermost): it then sees the status every other interceptor produced,
    and the caller the authentication interceptor found."""

    def __init__(self) -> None:
        self._handlers = Rewrapped()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        return self._handlers.get(method, handler) or self._handlers.put(
            method,
            handler,
            rewrap(
                handler,
                lambda behavior, _: _logged_unary(behavior, method),
                lambda behavior, _: _logged_stream(behavior, method),
            ),
        )


def _log_rpc(
    method: str, started: float, exc: BaseException | None, context: grpc.aio.ServicerContext
) -> None:
    code = _status_name(exc, context)
    access_log.info(
        "%s %s",
        method,
        code,
        extra={
            "method": method,
            "code": code,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "caller": current_caller.get(),
            "peer": context.peer(),
        },
    )


def _logged_unary(behavior: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            _log_rpc(method, started, failure, context)

    return wrapped


def _logged_stream(behavior: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            failure = exc
            raise
        finally:
            _log_rpc(method, started, failure, context)

    return wrapped


# Never shed: a probe refused under load would take the pod out of service or restart it
# exactly when it is busiest.
UNLIMITED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """At most `limit` RPCs run at once (TALLY_MAX_CONCURRENT_RPCS); more are refused at
    once with RESOURCE_EXHAUSTED (reason OVERLOADED) before any work, and reported to
    `on_shed` (tally_rpcs_shed_total).

    grpc's own ``maximum_concurrent_rpcs`` refuses before any interceptor runs, so its
    refusals were counted nowhere, and it refused health checks too. Put this inside the
    metrics interceptor, so a shed call also counts in grpc_server_handled_total. Calls
    run on one event loop: a plain counter is exact."""

    def __init__(self, limit: int, on_shed: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self.on_shed = on_shed
        self.in_flight = 0
        self._handlers = Rewrapped()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(UNLIMITED_PREFIXES):
            return handler
        return self._handlers.get(method, handler) or self._handlers.put(
            method,
            handler,
            rewrap(
                handler,
                lambda behavior, _: self._wrap_unary(behavior, method),
                lambda behavior, _: self._wrap_stream(behavior, method),
            ),
        )

    async def _shed(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if self.on_shed is not None:
            self.on_shed(method)
        error = errors.Overloaded(
            f"the server is running its limit of {self.limit} calls; retry with backoff"
        )
        metrics.note_error(error)
        status = error.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _wrap_unary(self, behavior: Any, method: str) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.in_flight >= self.limit:
                await self._shed(context, method)
            self.in_flight += 1
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1

        return wrapped

    def _wrap_stream(self, behavior: Any, method: str) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if self.in_flight >= self.limit:
                await self._shed(context, method)
            self.in_flight += 1
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self.in_flight -= 1

        return wrapped
