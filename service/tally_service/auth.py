"""Who may call what: bearer tokens, hashed in configuration, each with its methods.

Configuration (TALLY_AUTH_TOKENS as JSON, or TALLY_AUTH_TOKENS_FILE naming a JSON
file) is a list of callers:

    [{"name": "image-api", "sha256": "<hex of the token>",
      "methods": ["tally.v1.MeteringService/*", "tally.v1.CreditsService/Reserve"]},
     {"name": "billing-admin", "sha256": "<hex>", "methods": ["*"]}]

Method patterns are shell-style globs over "package.Service/Method". Without any
caller configured, authentication is off (the embedded development default). Health
checks and reflection never need a token, so probes keep working.

A wrong or missing token is UNAUTHENTICATED, a method outside the caller's list is
PERMISSION_DENIED; both are raised as domain errors and mapped by the one error layer.
The caller's name is kept in a context variable for the request, and every ledger entry
written by the request records it in its metadata (the audit trail).
"""

import contextvars
import fnmatch
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from tally_service import errors
from tally_service.config import ConfigError
from tally_service.handlers import Rewrapped, rewrap

log = logging.getLogger(__name__)

current_caller: contextvars.ContextVar[str] = contextvars.ContextVar("current_caller", default="")

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")


class Unauthenticated(errors.DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = errors.reason_of(errors.R.ERROR_REASON_UNAUTHENTICATED)


class PermissionDenied(errors.DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = errors.reason_of(errors.R.ERROR_REASON_METHOD_NOT_ALLOWED)


@dataclass(frozen=True)
class Caller:
    name: str
    methods: tuple[str, ...]

    def may_call(self, method: str) -> bool:
        name = method.lstrip("/")
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.methods)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_callers(
    tokens_json: str | None = None, tokens_file: str | None = None
) -> dict[str, Caller]:
    """Callers by the SHA-256 of their token, from TALLY_AUTH_TOKENS(_FILE).

    Raises ConfigError naming the variable when the callers cannot be read."""
    if tokens_json is None:
        tokens_json = os.environ.get("TALLY_AUTH_TOKENS", "")
    if tokens_file is None:
        tokens_file = os.environ.get("TALLY_AUTH_TOKENS_FILE", "")
    source = "TALLY_AUTH_TOKENS"
    if tokens_file:
        source = f"TALLY_AUTH_TOKENS_FILE ({tokens_file})"
        try:
            with open(tokens_file) as f:
                tokens_json = f.read()
        except OSError as exc:
            raise ConfigError([f"{source}: cannot read it: {exc.strerror}"]) from None
    if not tokens_json.strip():
        return {}
    try:
        return parse_callers(tokens_json)
    except ValueError as exc:
        raise ConfigError([f"{source} is not valid: {exc}"]) from None


def parse_callers(tokens_json: str) -> dict[str, Caller]:
    """Parses the callers' JSON; ValueError says what is wrong."""
    try:
        items = json.loads(tokens_json)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    shape = 'expected a JSON list of {"name": ..., "sha256": ..., "methods": [...]}'
    if not isinstance(items, list):
        raise ValueError(shape)
    callers: dict[str, Caller] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"item {index}: {shape}")
        name = item["name"]
        digest = str(item.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"caller {name!r}: sha256 must be 64 hex digits (tally hash-token)")
        methods = item.get("methods")
        if not isinstance(methods, list) or not all(isinstance(m, str) and m for m in methods):
            raise ValueError(f"caller {name!r}: methods must be a list of method globs")
        if digest in callers:
            raise ValueError(f"caller {name!r}: the same sha256 as {callers[digest].name!r}")
        callers[digest] = Caller(name, tuple(methods))
    return callers


class TokenFile:
    """The callers of TALLY_AUTH_TOKENS_FILE, read again when the file changes (checked at
    most once every `check_seconds`, on a call): tokens rotate with no restart. A file that
    cannot be read or parsed is logged and skipped; the callers before it stay."""

    def __init__(self, path: str, check_seconds: float = 1.0) -> None:
        self.path = path
        self.check_seconds = check_seconds
        self._signature = self._stat()
        self.callers = load_callers("", path)
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> dict[str, Caller]:
        now = time.monotonic()
        if now - self._checked < self.check_seconds:
            return self.callers
        self._checked = now
        try:
            signature = self._stat()
            if signature == self._signature:
                return self.callers
            callers = load_callers("", self.path)
        except (OSError, ConfigError) as exc:
            log.error("TALLY_AUTH_TOKENS_FILE changed but cannot be used: %s", exc)
            return self.callers
        self._signature = signature
        self.callers = callers
        log.info(
            "TALLY_AUTH_TOKENS_FILE changed: reloaded",
            extra={"callers": sorted({c.name for c in callers.values()})},
        )
        return callers


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the bearer token; must come after ErrorMappingInterceptor in the list, so
    that the errors it raises are mapped like any other. `callers` is fixed
    (TALLY_AUTH_TOKENS) or a TokenFile (TALLY_AUTH_TOKENS_FILE, followed as it changes)."""

    def __init__(self, callers: "dict[str, Caller] | TokenFile") -> None:
        self.source = callers
        self._handlers = Rewrapped()

    @property
    def callers(self) -> dict[str, Caller]:
        source = self.source
        return source.current() if isinstance(source, TokenFile) else source

    def _caller(self, method: str, metadata: Any) -> Caller:
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("a bearer token is required (authorization: Bearer <token>)")
        caller = self.callers.get(hash_token(token.strip()))
        if caller is None:
            raise Unauthenticated("unknown token")
        if not caller.may_call(method):
            raise PermissionDenied(
                f"caller {caller.name!r} may not call {method}",
                metadata={"caller": caller.name, "method": method},
            )
        return caller

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        cached = self._handlers.get(method, handler)
        if cached is not None:
            return cached
        check = self._caller

        # The token is read from the call's own metadata (the context's, the same as
        # the details'), so the wrapped handler holds nothing of one call and is made
        # once per method.
        def unary(behavior: Any, _: str) -> Any:
            async def checked(request: Any, context: Any) -> Any:
                current_caller.set(check(method, context.invocation_metadata()).name)
                return await behavior(request, context)

            return checked

        def stream(behavior: Any, _: str) -> Any:
            async def checked(request: Any, context: Any) -> Any:
                current_caller.set(check(method, context.invocation_metadata()).name)
                async for response in behavior(request, context):
                    yield response

            return checked

        return self._handlers.put(method, handler, rewrap(handler, unary, stream))
