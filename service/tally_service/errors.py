"""Domain errors, and the one place they become gRPC statuses (AIP-193).

Handlers and the read queries raise these; ``interceptors.ErrorMappingInterceptor`` turns them
into a ``google.rpc.Status`` with an ``ErrorInfo`` (and a ``BadRequest`` for validation).
Every ``ErrorInfo.reason`` is derived from the ``tally.v1.ErrorReason`` enum
(``protos/tally/v1/error_reason.proto``): the value's name without ``ERROR_REASON_``.
"""

from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tally.v1 import error_reason_pb2

DOMAIN = "tally"
REASON_PREFIX = "ERROR_REASON_"
R = error_reason_pb2.ErrorReason


def reason_of(value: "error_reason_pb2.ErrorReason.ValueType") -> str:
    """The ErrorInfo.reason of an ErrorReason value: its name without the prefix."""
    return R.Name(value).removeprefix(REASON_PREFIX)


#: The reason of NOT_FOUND for each resource the read queries and the money functions name.
NOT_FOUND_REASONS: dict[str, str] = {
    "account": reason_of(R.ERROR_REASON_ACCOUNT_NOT_FOUND),
    "reservation": reason_of(R.ERROR_REASON_RESERVATION_NOT_FOUND),
    "entry": reason_of(R.ERROR_REASON_ENTRY_NOT_FOUND),
    "product": reason_of(R.ERROR_REASON_PRODUCT_NOT_FOUND),
    "event": reason_of(R.ERROR_REASON_EVENT_NOT_FOUND),
    "grant": reason_of(R.ERROR_REASON_GRANT_NOT_FOUND),
    "reload": reason_of(R.ERROR_REASON_RELOAD_NOT_FOUND),
    "threshold": reason_of(R.ERROR_REASON_THRESHOLD_NOT_FOUND),
    "notification": reason_of(R.ERROR_REASON_NOTIFICATION_NOT_FOUND),
    "report_version": reason_of(R.ERROR_REASON_REPORT_VERSION_NOT_FOUND),
}

# A quoted value is cut to this many characters (then "…"), and a whole message,
# field description or metadata value to MAX_TEXT_CHARS, so that no input, however
# large, makes a large status (the trailers carry it; gRPC limits their size).
MAX_QUOTED_CHARS = 64
MAX_TEXT_CHARS = 1024


def quote(value: object) -> str:
    """The value's repr for an error message, bounded to MAX_QUOTED_CHARS characters."""
    text = repr(value)
    if len(text) <= MAX_QUOTED_CHARS:
        return text
    return text[:MAX_QUOTED_CHARS] + "…"


def bounded(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """The text, cut to `limit` characters (then "…")."""
    return text if len(text) <= limit else text[:limit] + "…"


class DomainError(Exception):
    """An error a caller can act on, with a gRPC code and a machine-readable reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = reason_of(R.ERROR_REASON_INTERNAL)

    def __init__(
        self,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.metadata = {bounded(k, 64): bounded(v) for k, v in (metadata or {}).items()}
        self.field_violations = [(bounded(f, 256), bounded(d)) for f, d in field_violations]

    def to_rpc_status(self) -> status_pb2.Status:
        """The error as a google.rpc.Status (also used per item of a batch)."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        info.metadata.update(self.metadata)
        details = [info]
        if self.field_violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.field_violations
                    ]
                )
            )
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=packed
        )

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_rpc_status())


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = reason_of(R.ERROR_REASON_VALIDATION_FAILED)

    def __init__(self, field: str, description: str) -> None:
        super().__init__(
            f"invalid {field}: {description}",
            metadata={"field": field},
            field_violations=[(field, description)],
        )
        self.field = field


class CaptureExceedsHold(InvalidArgument):
    reason = reason_of(R.ERROR_REASON_CAPTURE_EXCEEDS_HOLD)


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, resource: str, resource_id: str) -> None:
        super().__init__(
            f"{resource} {quote(resource_id)} not found",
            metadata={"resource": resource, "id": resource_id},
        )
        # A resource missing from the catalog is a fault of this code (tests check them).
        self.reason = NOT_FOUND_REASONS[resource]


class AccountAlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = reason_of(R.ERROR_REASON_ACCOUNT_ALREADY_EXISTS)


class RequestIdReused(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = reason_of(R.ERROR_REASON_REQUEST_ID_REUSED)


class InsufficientCredits(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = reason_of(R.ERROR_REASON_INSUFFICIENT_CREDITS)


class EventIdReused(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = reason_of(R.ERROR_REASON_EVENT_ID_REUSED)


class EventNotPending(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = reason_of(R.ERROR_REASON_EVENT_NOT_PENDING)


class ReservationNotPending(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = reason_of(R.ERROR_REASON_RESERVATION_NOT_PENDING)


class ReservationOfUsageEvent(DomainError):
    """The hold belongs to a long job (StartUsage): only CompleteUsage or FailUsage may
    finish it, so that the event and its hold finish together."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = reason_of(R.ERROR_REASON_RESERVATION_OF_USAGE_EVENT)


class BalanceLimit(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = reason_of(R.ERROR_REASON_BALANCE_LIMIT)


class TooManyThresholds(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = reason_of(R.ERROR_REASON_TOO_MANY_THRESHOLDS)


class PeriodNotClosed(DomainError):
    """A period report was asked for before the period ended."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = reason_of(R.ERROR_REASON_PERIOD_NOT_CLOSED)


class AccountTimeZoneUnknown(DomainError):
    """The account's stored time zone is one this server or its database does not know
    (stored before such names were refused), so its local time cannot be computed."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = reason_of(R.ERROR_REASON_ACCOUNT_TIME_ZONE_UNKNOWN)

    def __init__(self, account_id: str | None, time_zone: str) -> None:
        whose = f"account {quote(account_id)}'s" if account_id else "the account's"
        super().__init__(
            f"{whose} time zone {quote(time_zone)} is not one this service knows; "
            "set another with UpdateAccount",
            metadata={"time_zone": time_zone} | ({"account_id": account_id} if account_id else {}),
        )


class DatabaseUnavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = reason_of(R.ERROR_REASON_DATABASE_UNAVAILABLE)


class Overloaded(DomainError):
    """Refused unstarted: the process already runs TALLY_MAX_CONCURRENT_RPCS calls."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = reason_of(R.ERROR_REASON_OVERLOADED)


class CallTimeout(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = reason_of(R.ERROR_REASON_CALL_TIMEOUT)


class Internal(DomainError):
    code = grpc.StatusCode.INTERNAL
    reason = reason_of(R.ERROR_REASON_INTERNAL)
