"""Python client of the Tally gRPC service (metering, credits, ledger).

>>> from tally_client import TallyClient, InsufficientCredits
>>> with TallyClient("127.0.0.1:50051") as tally:  # doctest: +SKIP
...     tally.create_account("acme", name="Acme")
...     tally.top_up("acme", "10")
...     tally.debit("acme", "2.95", reference="order-1")
...     tally.get_balance("acme").available
'7.05'
"""

from __future__ import annotations

from ._requests import EntryTypeArg, new_request_id
from ._retry import RETRYABLE_CODES
from .amounts import Amount, from_wire, to_wire
from .client import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_SECONDS,
    AsyncStubs,
    AsyncTallyClient,
    Metadata,
    Stubs,
    TallyClient,
)
from .errors import (
    DOMAIN,
    Aborted,
    AccountAlreadyExists,
    AccountNotFound,
    AlreadyExists,
    Cancelled,
    CaptureExceedsHold,
    DataLoss,
    DeadlineExceeded,
    EntryNotFound,
    FailedPrecondition,
    InsufficientCredits,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    RequestIdReused,
    ReservationNotFound,
    ReservationNotPending,
    ResourceExhausted,
    TallyError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    error_from_rpc,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT_SECONDS",
    "DOMAIN",
    "RETRYABLE_CODES",
    "Aborted",
    "AccountAlreadyExists",
    "AccountNotFound",
    "AlreadyExists",
    "Amount",
    "AsyncStubs",
    "AsyncTallyClient",
    "Cancelled",
    "CaptureExceedsHold",
    "DataLoss",
    "DeadlineExceeded",
    "EntryNotFound",
    "EntryTypeArg",
    "FailedPrecondition",
    "InsufficientCredits",
    "Internal",
    "InvalidArgument",
    "Metadata",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "RequestIdReused",
    "ReservationNotFound",
    "ReservationNotPending",
    "ResourceExhausted",
    "Stubs",
    "TallyClient",
    "TallyError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_from_rpc",
    "from_wire",
    "new_request_id",
    "to_wire",
]
