"""Python client of the Tally gRPC service (metering, credits, ledger).

>>> from tally_client import TallyClient, InsufficientCredits
>>> with TallyClient("127.0.0.1:50051") as tally:  # doctest: +SKIP
...     tally.create_account("acme", display_name="Acme")
...     tally.top_up("acme", "10")
...     tally.debit("acme", "2.95", reference="order-1")
...     tally.get_balance("acme").available
'7.05'
>>> with TallyClient("127.0.0.1:50051") as tally:  # doctest: +SKIP
...     tally.create_account("beta")
...     tally.set_subscription("beta", "pro", "100", period="monthly")
...     tally.top_up("beta", "5", grant_type="promotional", priority=5)
...     [(g.remaining, g.priority) for g in tally.list_grants("beta")]
[('5', 5), ('100', 10)]
>>> with TallyClient("127.0.0.1:50051") as tally:  # doctest: +SKIP
...     tally.upsert_product("PAN-Plus", "0.5")
...     tally.record_usage("acme", "txn-1", "PAN-Plus", endpoint="/pan/verify")
...     tally.get_usage("acme", preset="Last 7 days").totals.credits_consumed
'0.5'
"""

from __future__ import annotations

from ._requests import (
    EntryTypeArg,
    GrantTypeArg,
    RangePresetArg,
    ReportFormatArg,
    ReservationStatusArg,
    SubscriptionPeriodArg,
    ThresholdMetricArg,
    ThresholdPeriodArg,
    UsagePeriodArg,
    UsageStatusArg,
    new_request_id,
    usage_event,
)
from ._retry import RETRYABLE_CODES
from ._service_config import service_config, service_config_json
from .amounts import Amount, from_wire, to_wire
from .client import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_SECONDS,
    STREAM_TIMEOUT_FACTOR,
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
    AccountTimeZoneUnknown,
    AlreadyExists,
    BalanceLimit,
    Cancelled,
    CaptureExceedsHold,
    DataLoss,
    DeadlineExceeded,
    EntryNotFound,
    EventIdReused,
    EventNotFound,
    EventNotPending,
    FailedPrecondition,
    GrantNotFound,
    InsufficientCredits,
    Internal,
    InvalidArgument,
    NotFound,
    NotificationNotFound,
    OutOfRange,
    PeriodNotClosed,
    PermissionDenied,
    ProductNotFound,
    ReloadNotFound,
    ReportVersionNotFound,
    RequestIdReused,
    ReservationNotFound,
    ReservationNotPending,
    ReservationOfUsageEvent,
    ResourceExhausted,
    TallyError,
    ThresholdNotFound,
    TooManyThresholds,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    error_from_rpc,
    error_from_status,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT_SECONDS",
    "DOMAIN",
    "RETRYABLE_CODES",
    "STREAM_TIMEOUT_FACTOR",
    "Aborted",
    "AccountAlreadyExists",
    "AccountNotFound",
    "AccountTimeZoneUnknown",
    "AlreadyExists",
    "Amount",
    "AsyncStubs",
    "AsyncTallyClient",
    "BalanceLimit",
    "Cancelled",
    "CaptureExceedsHold",
    "DataLoss",
    "DeadlineExceeded",
    "EntryNotFound",
    "EntryTypeArg",
    "EventIdReused",
    "EventNotFound",
    "EventNotPending",
    "FailedPrecondition",
    "GrantNotFound",
    "GrantTypeArg",
    "InsufficientCredits",
    "Internal",
    "InvalidArgument",
    "Metadata",
    "NotFound",
    "NotificationNotFound",
    "OutOfRange",
    "PeriodNotClosed",
    "PermissionDenied",
    "ProductNotFound",
    "RangePresetArg",
    "ReloadNotFound",
    "ReportFormatArg",
    "ReportVersionNotFound",
    "RequestIdReused",
    "ReservationNotFound",
    "ReservationNotPending",
    "ReservationOfUsageEvent",
    "ReservationStatusArg",
    "ResourceExhausted",
    "Stubs",
    "SubscriptionPeriodArg",
    "TallyClient",
    "TallyError",
    "ThresholdMetricArg",
    "ThresholdNotFound",
    "ThresholdPeriodArg",
    "TooManyThresholds",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UsagePeriodArg",
    "UsageStatusArg",
    "error_from_rpc",
    "error_from_status",
    "from_wire",
    "new_request_id",
    "service_config",
    "service_config_json",
    "to_wire",
    "usage_event",
]
