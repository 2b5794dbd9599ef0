"""Typed exceptions built from a gRPC error's rich status.

The server attaches a ``google.rpc.Status`` to every error (trailer
``grpc-status-details-bin``) whose details carry a ``google.rpc.ErrorInfo``
(domain ``"tally"``, a machine-readable ``reason``, string ``metadata``) and, for
validation failures, a ``google.rpc.BadRequest`` with field violations.

:func:`error_from_rpc` turns any :class:`grpc.RpcError` (sync or ``grpc.aio``)
into the most specific :class:`TallyError` subclass: first by ErrorInfo reason
(e.g. :class:`InsufficientCredits`), then by status code (e.g.
:class:`FailedPrecondition`), else :class:`TallyError` itself.

:func:`error_from_status` does the same for a bare ``google.rpc.Status``, such as
the per-event ``UsageResult.status`` of a batch or stream (``None`` when OK).

The reasons are the values of the ``tally.v1.ErrorReason`` enum, each sent as its name
without ``ERROR_REASON_``: every value has a class here whose ``grpc_reason`` is derived
from it, or is listed in :data:`GENERIC_REASONS`, raised as the class of its status code
(a validation failure is :class:`InvalidArgument` with ``field_violations``, an outage
:class:`Unavailable`, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tally.v1 import error_reason_pb2

__all__ = [
    "DOMAIN",
    "GENERIC_REASONS",
    "STATUS_DETAILS_KEY",
    "Aborted",
    "AccountAlreadyExists",
    "AccountNotFound",
    "AccountTimeZoneUnknown",
    "AlreadyExists",
    "BalanceLimit",
    "Cancelled",
    "CaptureExceedsHold",
    "DataLoss",
    "DeadlineExceeded",
    "EntryNotFound",
    "EventIdReused",
    "EventNotFound",
    "EventNotPending",
    "FailedPrecondition",
    "GrantNotFound",
    "InsufficientCredits",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "NotificationNotFound",
    "OutOfRange",
    "PeriodNotClosed",
    "PermissionDenied",
    "ProductNotFound",
    "ReloadNotFound",
    "ReportVersionNotFound",
    "RequestIdReused",
    "ReservationNotFound",
    "ReservationNotPending",
    "ReservationOfUsageEvent",
    "ResourceExhausted",
    "TallyError",
    "ThresholdNotFound",
    "TooManyThresholds",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_from_rpc",
    "error_from_status",
    "reason_of",
]

#: The ErrorInfo domain of the Tally server.
DOMAIN = "tally"

#: Trailing-metadata key of the serialized ``google.rpc.Status``.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

_R = error_reason_pb2.ErrorReason


def reason_of(value: error_reason_pb2.ErrorReason.ValueType) -> str:
    """The ``ErrorInfo.reason`` of an ``ErrorReason`` value (its name without
    ``ERROR_REASON_``)."""
    return _R.Name(value).removeprefix("ERROR_REASON_")


class TallyError(Exception):
    """An RPC to the Tally server failed.

    Attributes:
        code: the gRPC status code.
        message: the status message.
        reason: ``ErrorInfo.reason`` (e.g. ``"INSUFFICIENT_CREDITS"``); ``""`` if none.
        domain: ``ErrorInfo.domain`` (``"tally"`` for the server's own errors).
        metadata: ``ErrorInfo.metadata``.
        field_violations: ``(field, description)`` pairs from ``google.rpc.BadRequest``.
        status: the full ``google.rpc.Status``, or ``None`` when the error had none.
    """

    #: The status code this class stands for (``None``: any).
    grpc_code: Any = None
    #: The ErrorInfo reason this class stands for (``None``: any).
    grpc_reason: str | None = None

    code: Any  # grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    field_violations: list[tuple[str, str]]
    status: Any  # google.rpc.status_pb2.Status | None

    def __init__(
        self,
        code: Any,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        status: Any = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.status = status
        super().__init__(self._summary())

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. ``"FAILED_PRECONDITION"``."""
        name = getattr(self.code, "name", None)
        return name if isinstance(name, str) else str(self.code)

    def _summary(self) -> str:
        head = f"{self.code_name} {self.reason}" if self.reason else self.code_name
        text = f"{head}: {self.message}"
        if self.field_violations:
            text += " [" + "; ".join(f"{f}: {d}" for f, d in self.field_violations) + "]"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments: rebuild from the attributes.
        return (_rebuild, (type(self), dict(self.__dict__)))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code_name}, reason={self.reason!r}, "
            f"message={self.message!r}, metadata={self.metadata!r}, "
            f"field_violations={self.field_violations!r})"
        )


def _rebuild(cls: type[TallyError], state: dict[str, Any]) -> TallyError:
    err = cls.__new__(cls)
    err.__dict__.update(state)
    Exception.__init__(err, err._summary())
    return err


# --- by status code --------------------------------------------------------


class Cancelled(TallyError):
    grpc_code = grpc.StatusCode.CANCELLED


class Unknown(TallyError):
    grpc_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(TallyError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(TallyError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(TallyError):
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TallyError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(TallyError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(TallyError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(TallyError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(TallyError):
    grpc_code = grpc.StatusCode.ABORTED


class OutOfRange(TallyError):
    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(TallyError):
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(TallyError):
    grpc_code = grpc.StatusCode.INTERNAL


class Unavailable(TallyError):
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(TallyError):
    grpc_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(TallyError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


# --- by ErrorInfo reason (only used when the code matches too) -------------


class InsufficientCredits(FailedPrecondition):
    grpc_reason = reason_of(_R.ERROR_REASON_INSUFFICIENT_CREDITS)


class ReservationNotPending(FailedPrecondition):
    grpc_reason = reason_of(_R.ERROR_REASON_RESERVATION_NOT_PENDING)


class RequestIdReused(AlreadyExists):
    grpc_reason = reason_of(_R.ERROR_REASON_REQUEST_ID_REUSED)


class AccountAlreadyExists(AlreadyExists):
    grpc_reason = reason_of(_R.ERROR_REASON_ACCOUNT_ALREADY_EXISTS)


class AccountNotFound(NotFound):
    grpc_reason = reason_of(_R.ERROR_REASON_ACCOUNT_NOT_FOUND)


class ReservationNotFound(NotFound):
    grpc_reason = reason_of(_R.ERROR_REASON_RESERVATION_NOT_FOUND)


class EntryNotFound(NotFound):
    grpc_reason = reason_of(_R.ERROR_REASON_ENTRY_NOT_FOUND)


class CaptureExceedsHold(InvalidArgument):
    grpc_reason = reason_of(_R.ERROR_REASON_CAPTURE_EXCEEDS_HOLD)


class EventIdReused(AlreadyExists):
    """A usage ``event_id`` was recorded before with a different payload."""

    grpc_reason = reason_of(_R.ERROR_REASON_EVENT_ID_REUSED)


class EventNotPending(FailedPrecondition):
    """The started event was already completed, failed or expired."""

    grpc_reason = reason_of(_R.ERROR_REASON_EVENT_NOT_PENDING)


class ProductNotFound(NotFound):
    grpc_reason = reason_of(_R.ERROR_REASON_PRODUCT_NOT_FOUND)


class EventNotFound(NotFound):
    grpc_reason = reason_of(_R.ERROR_REASON_EVENT_NOT_FOUND)


class GrantNotFound(NotFound):
    grpc_reason = reason_of(_R.ERROR_REASON_GRANT_NOT_FOUND)


class ReloadNotFound(NotFound):
    grpc_reason = reason_of(_R.ERROR_REASON_RELOAD_NOT_FOUND)


class ThresholdNotFound(NotFound):
    grpc_reason = reason_of(_R.ERROR_REASON_THRESHOLD_NOT_FOUND)


class NotificationNotFound(NotFound):
    grpc_reason = reason_of(_R.ERROR_REASON_NOTIFICATION_NOT_FOUND)


class TooManyThresholds(FailedPrecondition):
    """The account has as many live thresholds as it may: delete one first."""

    grpc_reason = reason_of(_R.ERROR_REASON_TOO_MANY_THRESHOLDS)


class PeriodNotClosed(FailedPrecondition):
    """The period of a report has not ended yet: ask again after its end."""

    grpc_reason = reason_of(_R.ERROR_REASON_PERIOD_NOT_CLOSED)


class AccountTimeZoneUnknown(FailedPrecondition):
    """The account's stored time zone is unknown to the service (stored before such
    names were refused): set another with ``update_account``."""

    grpc_reason = reason_of(_R.ERROR_REASON_ACCOUNT_TIME_ZONE_UNKNOWN)


class ReportVersionNotFound(NotFound):
    """The period report has no such version (its versions are 1 to the latest)."""

    grpc_reason = reason_of(_R.ERROR_REASON_REPORT_VERSION_NOT_FOUND)


class ReservationOfUsageEvent(FailedPrecondition):
    """The hold belongs to a long job: finish it with CompleteUsage or FailUsage."""

    grpc_reason = reason_of(_R.ERROR_REASON_RESERVATION_OF_USAGE_EVENT)


class BalanceLimit(FailedPrecondition):
    """The movement would take the balance out of the range Tally stores."""

    grpc_reason = reason_of(_R.ERROR_REASON_BALANCE_LIMIT)


_CODE_CLASSES: tuple[type[TallyError], ...] = (
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
)
_REASON_CLASSES: tuple[type[TallyError], ...] = (
    InsufficientCredits,
    ReservationNotPending,
    RequestIdReused,
    AccountAlreadyExists,
    AccountNotFound,
    ReservationNotFound,
    EntryNotFound,
    CaptureExceedsHold,
    EventIdReused,
    EventNotPending,
    ProductNotFound,
    EventNotFound,
    GrantNotFound,
    ReloadNotFound,
    ThresholdNotFound,
    NotificationNotFound,
    TooManyThresholds,
    ReservationOfUsageEvent,
    BalanceLimit,
    PeriodNotClosed,
    ReportVersionNotFound,
    AccountTimeZoneUnknown,
)
#: The reasons without a class of their own, raised as the class of their status code.
GENERIC_REASONS: dict[str, type[TallyError]] = {
    reason_of(_R.ERROR_REASON_VALIDATION_FAILED): InvalidArgument,
    reason_of(_R.ERROR_REASON_DATABASE_UNAVAILABLE): Unavailable,
    reason_of(_R.ERROR_REASON_OVERLOADED): ResourceExhausted,
    reason_of(_R.ERROR_REASON_CALL_TIMEOUT): DeadlineExceeded,
    reason_of(_R.ERROR_REASON_INTERNAL): Internal,
    reason_of(_R.ERROR_REASON_UNAUTHENTICATED): Unauthenticated,
    reason_of(_R.ERROR_REASON_METHOD_NOT_ALLOWED): PermissionDenied,
}
_BY_CODE: dict[Any, type[TallyError]] = {c.grpc_code: c for c in _CODE_CLASSES}
_BY_REASON: dict[tuple[Any, str], type[TallyError]] = {
    (c.grpc_code, c.grpc_reason): c for c in _REASON_CLASSES if c.grpc_reason is not None
}
#: ``google.rpc.Code`` numbers (as in ``google.rpc.Status.code``) to ``grpc.StatusCode``.
_CODE_BY_NUMBER: dict[int, Any] = {c.value[0]: c for c in grpc.StatusCode}


def error_class(code: Any, reason: str) -> type[TallyError]:
    """The most specific exception class for a status code and ErrorInfo reason."""
    return _BY_REASON.get((code, reason)) or _BY_CODE.get(code) or TallyError


def error_from_rpc(e: grpc.RpcError) -> TallyError:
    """Build the typed exception for a failed RPC (sync or ``grpc.aio``).

    Never raises: a missing or undecodable rich status just leaves ``reason``,
    ``metadata`` and ``field_violations`` empty.
    """
    code = _call_attr(e, "code")
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    details = _call_attr(e, "details")
    message = details if isinstance(details, str) else ""
    status = _rich_status(e)
    if status is not None and status.message and not message:
        message = status.message
    if not message and status is None and not hasattr(e, "details"):
        message = str(e)  # a bare RpcError raised by other code
    return _build(code, message, status)


def error_from_status(status: status_pb2.Status) -> TallyError | None:
    """The typed exception for a ``google.rpc.Status`` (e.g. ``UsageResult.status``).

    Returns ``None`` for OK (code 0, which is also an unset status). The
    exception is returned, not raised; its ``status`` attribute is ``status``.
    An unknown code number becomes UNKNOWN.
    """
    if status.code == 0:
        return None
    code = _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    return _build(code, status.message, status)


def _build(code: Any, message: str, status: Any) -> TallyError:
    """The exception for ``code``, reading ErrorInfo and BadRequest from ``status``."""
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    if status is not None:
        for any_msg in status.details:
            try:
                if any_msg.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    any_msg.Unpack(info)
                    if not reason:  # the first ErrorInfo wins
                        reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
                elif any_msg.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    any_msg.Unpack(bad)
                    violations.extend((v.field, v.description) for v in bad.field_violations)
            except Exception:
                continue  # an undecodable detail is skipped
    cls = error_class(code, reason)
    return cls(
        code,
        message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        status=status,
    )


def _call_attr(e: grpc.RpcError, name: str) -> Any:
    """``e.code()`` / ``e.details()`` / ``e.trailing_metadata()``, or None."""
    fn = getattr(e, name, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:
        return None


def _rich_status(e: grpc.RpcError) -> Any:
    """The ``google.rpc.Status`` of a failed call, or None."""
    if not isinstance(e, grpc.aio.AioRpcError) and isinstance(e, grpc.Call):
        # Sync errors: the reference implementation, which also checks that the
        # status agrees with the call's code and message.
        try:
            status = rpc_status.from_call(e)
        except ValueError:
            status = None  # inconsistent status: fall back to the raw trailer
        except Exception:
            return None
        if status is not None:
            return status
    # grpc.aio (whose AioRpcError holds the trailers already received), or a
    # status the reference implementation refused.
    trailers = _call_attr(e, "trailing_metadata")
    if not trailers:
        return None
    for item in trailers:
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes | bytearray):
            try:
                return status_pb2.Status.FromString(bytes(value))
            except Exception:
                return None
    return None
