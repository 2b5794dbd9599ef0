"""Request builders shared by the sync and async clients.

Each builder validates and converts its arguments once and returns an
:class:`Rpc`: which stub method to call, the request message, and how to pick the
result out of the response. The clients only add the call/retry loop, so a
mutating request is built (and its ``request_id`` chosen) exactly once and every
retry resends the very same message.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from tally.v1 import account_pb2, accounts_pb2, credits_pb2, ledger_pb2, metering_pb2

from .amounts import Amount, to_wire

ServiceName = Literal["accounts", "credits", "ledger", "metering"]
#: A ledger entry type: an ``EntryType`` value, or a name such as ``"credit"``,
#: ``"DEBIT"`` or ``"ENTRY_TYPE_ADJUSTMENT"``; ``None`` means all types.
EntryTypeArg = int | str | None
#: A usage status: a ``UsageStatus`` value or a name such as ``"completed"``,
#: ``"FAILED"`` or ``"USAGE_STATUS_PENDING"``; ``None`` leaves the server default.
UsageStatusArg = int | str | None
#: A bucket size: a ``UsagePeriod`` value or ``"daily"``, ``"monthly"``, ``"yearly"``
#: (also ``"day"``, ``"month"``, ``"year"``); ``None`` means the default (monthly).
UsagePeriodArg = int | str | None
#: A named range: a ``RangePreset`` value or a name, case-insensitive, with
#: spaces, hyphens or underscores: ``"today"``, ``"Yesterday"``, ``"Last 7 days"``,
#: ``"last_30_days"``, ``"This Month"``, ``"Last Month"``; ``None`` means no preset.
RangePresetArg = int | str | None
#: A report format: a ``ReportFormat`` value or ``"csv"`` / ``"xlsx"``.
ReportFormatArg = int | str | None
#: A grant's origin: a ``CreditGrantType`` value or ``"purchased"``, ``"subscription"``,
#: ``"promotional"``, ``"auto_reload"`` (any case, ``-`` or ``_``); ``None`` means the
#: server default (purchased).
GrantTypeArg = int | str | None
#: A subscription period: a ``SubscriptionPeriod`` value or ``"monthly"`` / ``"yearly"``
#: (also ``"month"`` / ``"year"``).
SubscriptionPeriodArg = int | str | None
#: What a threshold watches: a ``ThresholdMetric`` value or ``"available_credit"``,
#: ``"usage_credits"``, ``"usage_requests"`` (any case, ``-`` or ``_``).
ThresholdMetricArg = int | str | None
#: The period of a usage threshold: a ``ThresholdPeriod`` value or ``"day"`` / ``"month"``.
ThresholdPeriodArg = int | str | None
#: A reservation status: a ``ReservationStatus`` value or ``"pending"``, ``"captured"``,
#: ``"released"``, ``"expired"`` (any case); ``None`` means any status.
ReservationStatusArg = int | str | None

RespT = TypeVar("RespT", bound=Message)
ResultT = TypeVar("ResultT")


@dataclass(frozen=True, slots=True)
class Rpc(Generic[RespT, ResultT]):
    """One unary call, ready to send (and resend)."""

    service: ServiceName
    method: str
    request: Message
    unwrap: Callable[[RespT], ResultT]
    mutating: bool = False


def new_request_id() -> str:
    """A fresh idempotency key."""
    return str(uuid.uuid4())


def _request_id(request_id: str | None) -> str:
    return new_request_id() if request_id is None else request_id


def to_timestamp(dt: datetime) -> timestamp_pb2.Timestamp:
    """A timezone-aware datetime as a protobuf Timestamp (naive ones are refused)."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware, got naive {dt.isoformat()}")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def to_struct(metadata: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    """A JSON-like mapping as a ``google.protobuf.Struct`` (``None`` stays unset)."""
    if metadata is None:
        return None
    s = struct_pb2.Struct()
    s.update(metadata)
    return s


def entry_type(value: EntryTypeArg) -> ledger_pb2.EntryType.ValueType:
    """Normalize an :data:`EntryTypeArg` to an ``EntryType`` value."""
    if value is None:
        return ledger_pb2.ENTRY_TYPE_UNSPECIFIED
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("ENTRY_TYPE_"):
            name = "ENTRY_TYPE_" + name
        try:
            return ledger_pb2.EntryType.Value(name)
        except ValueError:
            choices = ", ".join(
                k.removeprefix("ENTRY_TYPE_").lower()
                for k, _ in ledger_pb2.EntryType.items()
                if k != "ENTRY_TYPE_UNSPECIFIED"
            )
            raise ValueError(f"unknown entry type {value!r} (expected one of {choices})") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"entry type must be an EntryType value or name, not {value!r}")
    return ledger_pb2.EntryType.ValueType(value)


def _enum_value(
    enum: Any,
    prefix: str,
    what: str,
    value: int | str | None,
    aliases: Mapping[str, str] | None = None,
) -> int:
    """An enum value from a value, a short or full name (see the ``*Arg`` aliases)."""
    if value is None:
        return 0
    if isinstance(value, str):
        name = "_".join(value.strip().upper().replace("-", " ").replace("_", " ").split())
        if aliases and name in aliases:
            name = aliases[name]
        if not name.startswith(prefix):
            name = prefix + name
        try:
            return int(enum.Value(name))
        except ValueError:
            choices = ", ".join(
                k.removeprefix(prefix).lower()
                for k, _ in enum.items()
                if not k.endswith("UNSPECIFIED")
            )
            raise ValueError(f"unknown {what} {value!r} (expected one of {choices})") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an enum value or name, not {value!r}")
    return value


def usage_status(value: UsageStatusArg) -> metering_pb2.UsageStatus.ValueType:
    """Normalize a :data:`UsageStatusArg` to a ``UsageStatus`` value."""
    return metering_pb2.UsageStatus.ValueType(
        _enum_value(metering_pb2.UsageStatus, "USAGE_STATUS_", "usage status", value)
    )


def reservation_status(value: ReservationStatusArg) -> credits_pb2.ReservationStatus.ValueType:
    """Normalize a :data:`ReservationStatusArg` to a ``ReservationStatus`` value."""
    return credits_pb2.ReservationStatus.ValueType(
        _enum_value(
            credits_pb2.ReservationStatus, "RESERVATION_STATUS_", "reservation status", value
        )
    )


def usage_period(value: UsagePeriodArg) -> metering_pb2.UsagePeriod.ValueType:
    """Normalize a :data:`UsagePeriodArg` to a ``UsagePeriod`` value."""
    aliases = {"DAY": "DAILY", "MONTH": "MONTHLY", "YEAR": "YEARLY"}
    return metering_pb2.UsagePeriod.ValueType(
        _enum_value(metering_pb2.UsagePeriod, "USAGE_PERIOD_", "usage period", value, aliases)
    )


def range_preset(value: RangePresetArg) -> metering_pb2.RangePreset.ValueType:
    """Normalize a :data:`RangePresetArg` to a ``RangePreset`` value."""
    return metering_pb2.RangePreset.ValueType(
        _enum_value(metering_pb2.RangePreset, "RANGE_PRESET_", "range preset", value)
    )


def report_format(value: ReportFormatArg) -> metering_pb2.ReportFormat.ValueType:
    """Normalize a :data:`ReportFormatArg` to a ``ReportFormat`` value."""
    return metering_pb2.ReportFormat.ValueType(
        _enum_value(metering_pb2.ReportFormat, "REPORT_FORMAT_", "report format", value)
    )


def credit_grant_type(value: GrantTypeArg) -> credits_pb2.CreditGrantType.ValueType:
    """Normalize a :data:`GrantTypeArg` to a ``CreditGrantType`` value."""
    return credits_pb2.CreditGrantType.ValueType(
        _enum_value(credits_pb2.CreditGrantType, "CREDIT_GRANT_TYPE_", "grant type", value)
    )


def threshold_metric(value: ThresholdMetricArg) -> credits_pb2.ThresholdMetric.ValueType:
    """Normalize a :data:`ThresholdMetricArg` to a ``ThresholdMetric`` value."""
    return credits_pb2.ThresholdMetric.ValueType(
        _enum_value(credits_pb2.ThresholdMetric, "THRESHOLD_METRIC_", "threshold metric", value)
    )


def threshold_period(value: ThresholdPeriodArg) -> credits_pb2.ThresholdPeriod.ValueType:
    """Normalize a :data:`ThresholdPeriodArg` to a ``ThresholdPeriod`` value."""
    return credits_pb2.ThresholdPeriod.ValueType(
        _enum_value(credits_pb2.ThresholdPeriod, "THRESHOLD_PERIOD_", "threshold period", value)
    )


def subscription_period(
    value: SubscriptionPeriodArg,
) -> accounts_pb2.SubscriptionPeriod.ValueType:
    """Normalize a :data:`SubscriptionPeriodArg` to a ``SubscriptionPeriod`` value."""
    aliases = {"MONTH": "MONTHLY", "YEAR": "YEARLY"}
    return accounts_pb2.SubscriptionPeriod.ValueType(
        _enum_value(
            accounts_pb2.SubscriptionPeriod,
            "SUBSCRIPTION_PERIOD_",
            "subscription period",
            value,
            aliases,
        )
    )


def _optional_timestamp(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if dt is None else to_timestamp(dt)


def _check_range(
    preset: RangePresetArg, start_time: datetime | None, end_time: datetime | None
) -> None:
    if preset is not None and (start_time is not None or end_time is not None):
        raise ValueError("give either a preset or start_time/end_time, not both")


# --- AccountsService -------------------------------------------------------


def create_account(
    account_id: str,
    *,
    email: str = "",
    display_name: str = "",
    time_zone: str = "",
    currency: str = "",
    overdraft_limit: Amount | None = None,
    trial_end_time: datetime | None = None,
    request_id: str | None = None,
) -> Rpc[accounts_pb2.CreateAccountResponse, account_pb2.Account]:
    account = account_pb2.Account(
        account_id=account_id,
        email=email,
        display_name=display_name,
        time_zone=time_zone,
        currency=currency,
        overdraft_limit="" if overdraft_limit is None else to_wire(overdraft_limit),
    )
    if trial_end_time is not None:
        account.trial_end_time.CopyFrom(to_timestamp(trial_end_time))
    req = accounts_pb2.CreateAccountRequest(request_id=_request_id(request_id), account=account)
    return Rpc("accounts", "CreateAccount", req, lambda r: r.account, mutating=True)


def get_account(account_id: str) -> Rpc[accounts_pb2.GetAccountResponse, account_pb2.Account]:
    req = accounts_pb2.GetAccountRequest(account_id=account_id)
    return Rpc("accounts", "GetAccount", req, lambda r: r.account)


def update_account(
    account_id: str,
    *,
    email: str | None = None,
    display_name: str | None = None,
    time_zone: str | None = None,
    overdraft_limit: Amount | None = None,
    trial_end_time: datetime | None = None,
    clear_trial_end_time: bool = False,
    request_id: str | None = None,
) -> Rpc[accounts_pb2.UpdateAccountResponse, account_pb2.Account]:
    """Only the arguments that are not None go into the update mask.

    ``clear_trial_end_time=True`` removes the trial end (the mask names the
    field, the value is left unset). With nothing to update the request is still
    sent and the server answers INVALID_ARGUMENT (empty mask).
    """
    if clear_trial_end_time and trial_end_time is not None:
        raise ValueError("give either trial_end_time or clear_trial_end_time=True, not both")
    account = account_pb2.Account(account_id=account_id)
    paths: list[str] = []
    if email is not None:
        account.email = email
        paths.append("email")
    if display_name is not None:
        account.display_name = display_name
        paths.append("display_name")
    if time_zone is not None:
        account.time_zone = time_zone
        paths.append("time_zone")
    if overdraft_limit is not None:
        account.overdraft_limit = to_wire(overdraft_limit)
        paths.append("overdraft_limit")
    if trial_end_time is not None:
        account.trial_end_time.CopyFrom(to_timestamp(trial_end_time))
        paths.append("trial_end_time")
    elif clear_trial_end_time:
        paths.append("trial_end_time")
    req = accounts_pb2.UpdateAccountRequest(
        request_id=_request_id(request_id),
        account=account,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )
    return Rpc("accounts", "UpdateAccount", req, lambda r: r.account, mutating=True)


def list_accounts(
    page_size: int = 0, page_token: str = ""
) -> Rpc[accounts_pb2.ListAccountsResponse, accounts_pb2.ListAccountsResponse]:
    req = accounts_pb2.ListAccountsRequest(page_size=page_size, page_token=page_token)
    return Rpc("accounts", "ListAccounts", req, lambda r: r)


def get_account_summary(
    account_id: str,
) -> Rpc[accounts_pb2.GetAccountSummaryResponse, accounts_pb2.GetAccountSummaryResponse]:
    req = accounts_pb2.GetAccountSummaryRequest(account_id=account_id)
    return Rpc("accounts", "GetAccountSummary", req, lambda r: r)


def set_subscription(
    account_id: str,
    plan: str,
    credits_per_period: Amount,
    *,
    period: SubscriptionPeriodArg = "monthly",
    anchor_time: datetime | None = None,
    rollover: bool = False,
    request_id: str | None = None,
) -> Rpc[accounts_pb2.SetSubscriptionResponse, accounts_pb2.Subscription]:
    """Set or change the plan; ``anchor_time=None`` lets the server start it now."""
    subscription = accounts_pb2.Subscription(
        plan=plan,
        credits_per_period=to_wire(credits_per_period),
        period=subscription_period(period),
        anchor_time=_optional_timestamp(anchor_time),
        rollover=rollover,
    )
    req = accounts_pb2.SetSubscriptionRequest(
        request_id=_request_id(request_id), account_id=account_id, subscription=subscription
    )
    return Rpc("accounts", "SetSubscription", req, lambda r: r.subscription, mutating=True)


def cancel_subscription(
    account_id: str, *, request_id: str | None = None
) -> Rpc[accounts_pb2.SetSubscriptionResponse, accounts_pb2.Subscription]:
    """SetSubscription with an empty plan."""
    req = accounts_pb2.SetSubscriptionRequest(
        request_id=_request_id(request_id),
        account_id=account_id,
        subscription=accounts_pb2.Subscription(plan=""),
    )
    return Rpc("accounts", "SetSubscription", req, lambda r: r.subscription, mutating=True)


# --- CreditsService --------------------------------------------------------


def get_balance(
    account_id: str, as_of: datetime | None = None
) -> Rpc[credits_pb2.GetBalanceResponse, credits_pb2.CreditBalance]:
    req = credits_pb2.GetBalanceRequest(
        account_id=account_id, as_of=None if as_of is None else to_timestamp(as_of)
    )
    return Rpc("credits", "GetBalance", req, lambda r: r.balance)


def reserve(
    account_id: str,
    amount: Amount,
    *,
    ttl_seconds: int = 0,
    reference: str = "",
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.ReserveResponse, credits_pb2.Reservation]:
    req = credits_pb2.ReserveRequest(
        request_id=_request_id(request_id),
        account_id=account_id,
        amount=to_wire(amount),
        ttl_seconds=ttl_seconds,
        reference=reference,
        metadata=to_struct(metadata),
    )
    return Rpc("credits", "Reserve", req, lambda r: r.reservation, mutating=True)


def capture(
    reservation_id: str,
    amount: Amount | None = None,
    *,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.CaptureResponse, credits_pb2.CaptureResponse]:
    """``amount=None`` captures the whole hold."""
    req = credits_pb2.CaptureRequest(
        request_id=_request_id(request_id),
        reservation_id=reservation_id,
        amount="" if amount is None else to_wire(amount),
        description=description,
        metadata=to_struct(metadata),
    )
    return Rpc("credits", "Capture", req, lambda r: r, mutating=True)


def release(
    reservation_id: str, *, request_id: str | None = None
) -> Rpc[credits_pb2.ReleaseResponse, credits_pb2.Reservation]:
    req = credits_pb2.ReleaseRequest(
        request_id=_request_id(request_id), reservation_id=reservation_id
    )
    return Rpc("credits", "Release", req, lambda r: r.reservation, mutating=True)


def get_reservation(
    reservation_id: str,
) -> Rpc[credits_pb2.GetReservationResponse, credits_pb2.Reservation]:
    req = credits_pb2.GetReservationRequest(reservation_id=reservation_id)
    return Rpc("credits", "GetReservation", req, lambda r: r.reservation)


def debit(
    account_id: str,
    amount: Amount,
    *,
    description: str = "",
    reference: str = "",
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.DebitResponse, ledger_pb2.LedgerEntry]:
    req = credits_pb2.DebitRequest(
        request_id=_request_id(request_id),
        account_id=account_id,
        amount=to_wire(amount),
        description=description,
        reference=reference,
        metadata=to_struct(metadata),
    )
    return Rpc("credits", "Debit", req, lambda r: r.entry, mutating=True)


def top_up(
    account_id: str,
    amount: Amount,
    *,
    description: str = "",
    reference: str = "",
    metadata: Mapping[str, Any] | None = None,
    grant_type: GrantTypeArg = None,
    expire_time: datetime | None = None,
    priority: int | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.TopUpResponse, ledger_pb2.LedgerEntry]:
    """``None`` leaves the grant's type (purchased), expiry (never) and priority
    (by type) to the server."""
    req = credits_pb2.TopUpRequest(
        request_id=_request_id(request_id),
        account_id=account_id,
        amount=to_wire(amount),
        description=description,
        reference=reference,
        metadata=to_struct(metadata),
        grant_type=credit_grant_type(grant_type),
        expire_time=_optional_timestamp(expire_time),
    )
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, not {priority!r}")
        req.priority = priority
    return Rpc("credits", "TopUp", req, lambda r: r.entry, mutating=True)


def adjust(
    account_id: str,
    amount: Amount,
    reason: str,
    *,
    reference: str = "",
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.AdjustResponse, ledger_pb2.LedgerEntry]:
    req = credits_pb2.AdjustRequest(
        request_id=_request_id(request_id),
        account_id=account_id,
        amount=to_wire(amount),
        reason=reason,
        reference=reference,
        metadata=to_struct(metadata),
    )
    return Rpc("credits", "Adjust", req, lambda r: r.entry, mutating=True)


def list_grants(
    account_id: str, *, include_spent: bool = False, page_size: int = 0, page_token: str = ""
) -> Rpc[credits_pb2.ListGrantsResponse, credits_pb2.ListGrantsResponse]:
    req = credits_pb2.ListGrantsRequest(
        account_id=account_id,
        include_spent=include_spent,
        page_size=page_size,
        page_token=page_token,
    )
    return Rpc("credits", "ListGrants", req, lambda r: r)


def set_auto_reload(
    account_id: str,
    *,
    enabled: bool,
    threshold: Amount = "0",
    amount: Amount = "0",
    max_reloads_per_day: int = 0,
    max_amount_per_month: Amount = "0",
    request_id: str | None = None,
) -> Rpc[credits_pb2.SetAutoReloadResponse, credits_pb2.AutoReloadSettings]:
    """0 / ``"0"`` caps mean no limit."""
    settings = credits_pb2.AutoReloadSettings(
        enabled=enabled,
        threshold=to_wire(threshold),
        amount=to_wire(amount),
        max_reloads_per_day=max_reloads_per_day,
        max_amount_per_month=to_wire(max_amount_per_month),
    )
    req = credits_pb2.SetAutoReloadRequest(
        request_id=_request_id(request_id), account_id=account_id, settings=settings
    )
    return Rpc("credits", "SetAutoReload", req, lambda r: r.settings, mutating=True)


def list_reloads(
    account_id: str, *, page_size: int = 0, page_token: str = ""
) -> Rpc[credits_pb2.ListReloadsResponse, credits_pb2.ListReloadsResponse]:
    req = credits_pb2.ListReloadsRequest(
        account_id=account_id, page_size=page_size, page_token=page_token
    )
    return Rpc("credits", "ListReloads", req, lambda r: r)


def get_grant(grant_id: str) -> Rpc[credits_pb2.GetGrantResponse, credits_pb2.CreditGrant]:
    req = credits_pb2.GetGrantRequest(grant_id=grant_id)
    return Rpc("credits", "GetGrant", req, lambda r: r.grant)


def get_reload(intent_id: str) -> Rpc[credits_pb2.GetReloadResponse, credits_pb2.ReloadIntent]:
    req = credits_pb2.GetReloadRequest(intent_id=intent_id)
    return Rpc("credits", "GetReload", req, lambda r: r.reload)


def list_reservations(
    account_id: str,
    *,
    status: ReservationStatusArg = None,
    page_size: int = 0,
    page_token: str = "",
) -> Rpc[credits_pb2.ListReservationsResponse, credits_pb2.ListReservationsResponse]:
    req = credits_pb2.ListReservationsRequest(
        account_id=account_id,
        status=reservation_status(status),
        page_size=page_size,
        page_token=page_token,
    )
    return Rpc("credits", "ListReservations", req, lambda r: r)


def create_threshold(
    account_id: str,
    *,
    metric: ThresholdMetricArg,
    value: Amount,
    percent: int = 0,
    period: ThresholdPeriodArg = None,
    request_id: str | None = None,
) -> Rpc[credits_pb2.CreateThresholdResponse, credits_pb2.Threshold]:
    """``value`` is credits, or a whole number of requests; ``percent`` 0 means 100."""
    threshold = credits_pb2.Threshold(
        metric=threshold_metric(metric),
        value=to_wire(value),
        percent=percent,
        period=threshold_period(period),
    )
    req = credits_pb2.CreateThresholdRequest(
        request_id=_request_id(request_id), account_id=account_id, threshold=threshold
    )
    return Rpc("credits", "CreateThreshold", req, lambda r: r.threshold, mutating=True)


def list_thresholds(
    account_id: str, *, page_size: int = 0, page_token: str = ""
) -> Rpc[credits_pb2.ListThresholdsResponse, credits_pb2.ListThresholdsResponse]:
    req = credits_pb2.ListThresholdsRequest(
        account_id=account_id, page_size=page_size, page_token=page_token
    )
    return Rpc("credits", "ListThresholds", req, lambda r: r)


def get_threshold(
    threshold_id: str,
) -> Rpc[credits_pb2.GetThresholdResponse, credits_pb2.Threshold]:
    req = credits_pb2.GetThresholdRequest(threshold_id=threshold_id)
    return Rpc("credits", "GetThreshold", req, lambda r: r.threshold)


def get_notification(
    notification_id: str,
) -> Rpc[credits_pb2.GetNotificationResponse, credits_pb2.Notification]:
    req = credits_pb2.GetNotificationRequest(notification_id=notification_id)
    return Rpc("credits", "GetNotification", req, lambda r: r.notification)


def delete_threshold(
    account_id: str, threshold_id: str, *, request_id: str | None = None
) -> Rpc[credits_pb2.DeleteThresholdResponse, credits_pb2.Threshold]:
    req = credits_pb2.DeleteThresholdRequest(
        request_id=_request_id(request_id), account_id=account_id, threshold_id=threshold_id
    )
    return Rpc("credits", "DeleteThreshold", req, lambda r: r.threshold, mutating=True)


def list_notifications(
    account_id: str, *, page_size: int = 0, page_token: str = ""
) -> Rpc[credits_pb2.ListNotificationsResponse, credits_pb2.ListNotificationsResponse]:
    req = credits_pb2.ListNotificationsRequest(
        account_id=account_id, page_size=page_size, page_token=page_token
    )
    return Rpc("credits", "ListNotifications", req, lambda r: r)


# --- LedgerService ---------------------------------------------------------


def list_entries(
    account_id: str,
    *,
    type: EntryTypeArg = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> Rpc[ledger_pb2.ListEntriesResponse, ledger_pb2.ListEntriesResponse]:
    req = ledger_pb2.ListEntriesRequest(
        account_id=account_id,
        type=entry_type(type),
        start_time=None if start_time is None else to_timestamp(start_time),
        end_time=None if end_time is None else to_timestamp(end_time),
        page_size=page_size,
        page_token=page_token,
    )
    return Rpc("ledger", "ListEntries", req, lambda r: r)


def get_entry(entry_id: int) -> Rpc[ledger_pb2.GetEntryResponse, ledger_pb2.LedgerEntry]:
    req = ledger_pb2.GetEntryRequest(entry_id=entry_id)
    return Rpc("ledger", "GetEntry", req, lambda r: r.entry)


def verify_account(
    account_id: str,
) -> Rpc[ledger_pb2.VerifyAccountResponse, ledger_pb2.VerifyAccountResponse]:
    req = ledger_pb2.VerifyAccountRequest(account_id=account_id)
    return Rpc("ledger", "VerifyAccount", req, lambda r: r)


# --- MeteringService -------------------------------------------------------


def upsert_product(
    product_id: str,
    credits_per_unit: Amount,
    *,
    display_name: str = "",
    charge_failed: bool = False,
    minimum_charge: Amount | None = None,
    request_id: str | None = None,
) -> Rpc[metering_pb2.UpsertProductResponse, metering_pb2.Product]:
    product = metering_pb2.Product(
        product_id=product_id,
        display_name=display_name,
        credits_per_unit=to_wire(credits_per_unit),
        charge_failed=charge_failed,
        minimum_charge="" if minimum_charge is None else to_wire(minimum_charge),
    )
    req = metering_pb2.UpsertProductRequest(request_id=_request_id(request_id), product=product)
    return Rpc("metering", "UpsertProduct", req, lambda r: r.product, mutating=True)


def list_products(
    page_size: int = 0, page_token: str = ""
) -> Rpc[metering_pb2.ListProductsResponse, metering_pb2.ListProductsResponse]:
    req = metering_pb2.ListProductsRequest(page_size=page_size, page_token=page_token)
    return Rpc("metering", "ListProducts", req, lambda r: r)


def get_product(product_id: str) -> Rpc[metering_pb2.GetProductResponse, metering_pb2.Product]:
    req = metering_pb2.GetProductRequest(product_id=product_id)
    return Rpc("metering", "GetProduct", req, lambda r: r.product)


def get_usage_event(
    account_id: str, event_id: str
) -> Rpc[metering_pb2.GetUsageEventResponse, metering_pb2.UsageEvent]:
    req = metering_pb2.GetUsageEventRequest(account_id=account_id, event_id=event_id)
    return Rpc("metering", "GetUsageEvent", req, lambda r: r.event)


def usage_event(
    account_id: str,
    event_id: str,
    product_id: str,
    *,
    endpoint: str = "",
    status: UsageStatusArg = None,
    success: bool | None = None,
    status_code: int = 0,
    message: str = "",
    quantity: int | None = None,
    credits: Amount | None = None,
    start_time: datetime | None = None,
    complete_time: datetime | None = None,
    processing_time_ms: int = 0,
    request_metadata: Mapping[str, Any] | None = None,
    result_metadata: Mapping[str, Any] | None = None,
    webhook_url: str = "",
) -> metering_pb2.UsageEvent:
    """A ``UsageEvent`` for :func:`record_usage_batch` / ``stream_usage``.

    ``event_id`` is the event's idempotency key (the caller's transaction id).
    ``None`` leaves a field unset, so the server applies its default: status
    COMPLETED, ``success`` true for COMPLETED, ``quantity`` 1, ``credits`` from
    the product's price, ``start_time`` now.
    """
    event = metering_pb2.UsageEvent(
        account_id=account_id,
        event_id=event_id,
        product_id=product_id,
        endpoint=endpoint,
        status=usage_status(status),
        status_code=status_code,
        message=message,
        credits="" if credits is None else to_wire(credits),
        start_time=_optional_timestamp(start_time),
        complete_time=_optional_timestamp(complete_time),
        processing_time_ms=processing_time_ms,
        request_metadata=to_struct(request_metadata),
        result_metadata=to_struct(result_metadata),
        webhook_url=webhook_url,
    )
    if success is not None:
        event.success = success
    if quantity is not None:
        if isinstance(quantity, bool):
            raise TypeError("quantity must be an int, not bool")
        event.quantity = quantity
    return event


def record_usage(
    event: metering_pb2.UsageEvent,
) -> Rpc[metering_pb2.RecordUsageResponse, metering_pb2.RecordUsageResponse]:
    """The event's ``event_id`` is the idempotency key: retries resend it unchanged."""
    req = metering_pb2.RecordUsageRequest(event=event)
    return Rpc("metering", "RecordUsage", req, lambda r: r, mutating=True)


def record_usage_batch(
    events: Iterable[metering_pb2.UsageEvent],
) -> Rpc[metering_pb2.RecordUsageBatchResponse, metering_pb2.RecordUsageBatchResponse]:
    req = metering_pb2.RecordUsageBatchRequest(events=list(events))
    return Rpc("metering", "RecordUsageBatch", req, lambda r: r, mutating=True)


#: Events per StreamUsage message (the server takes up to 1,000), and the serialised
#: size after which a message is sent with fewer (well under the 4 MiB message limit).
STREAM_EVENTS_PER_MESSAGE = 100
STREAM_MESSAGE_BYTES = 512 * 1024


def stream_usage_requests(
    events: Iterable[metering_pb2.UsageEvent],
) -> Iterator[metering_pb2.StreamUsageRequest]:
    """``StreamUsageRequest`` messages of up to ``STREAM_EVENTS_PER_MESSAGE`` events
    each, lazily."""
    batcher = StreamBatcher()
    for event in events:
        message = batcher.add(event)
        if message is not None:
            yield message
    last = batcher.flush()
    if last is not None:
        yield last


class StreamBatcher:
    """Packs events into ``StreamUsageRequest`` messages (``events``, several per
    message): ``add`` returns a full message to send, ``flush`` the rest."""

    def __init__(
        self,
        per_message: int = STREAM_EVENTS_PER_MESSAGE,
        max_bytes: int = STREAM_MESSAGE_BYTES,
    ) -> None:
        self.per_message = per_message
        self.max_bytes = max_bytes
        self._message = metering_pb2.StreamUsageRequest()
        self._bytes = 0

    def add(self, event: metering_pb2.UsageEvent) -> metering_pb2.StreamUsageRequest | None:
        _check_event(event)
        self._message.events.append(event)
        self._bytes += event.ByteSize()
        if len(self._message.events) >= self.per_message or self._bytes >= self.max_bytes:
            return self.flush()
        return None

    def flush(self) -> metering_pb2.StreamUsageRequest | None:
        if not self._message.events:
            return None
        message, self._message, self._bytes = self._message, metering_pb2.StreamUsageRequest(), 0
        return message


def stream_usage_request(event: metering_pb2.UsageEvent) -> metering_pb2.StreamUsageRequest:
    """One event as its own message (the original form of the stream)."""
    _check_event(event)
    return metering_pb2.StreamUsageRequest(event=event)


def _check_event(event: object) -> None:
    if not isinstance(event, metering_pb2.UsageEvent):
        raise TypeError(f"stream_usage takes UsageEvent messages, not {type(event).__name__}")


def start_usage(
    account_id: str,
    event_id: str,
    product_id: str,
    *,
    endpoint: str = "",
    status: UsageStatusArg = None,
    quantity: int | None = None,
    credits: Amount | None = None,
    ttl_seconds: int = 0,
    start_time: datetime | None = None,
    request_metadata: Mapping[str, Any] | None = None,
    webhook_url: str = "",
) -> Rpc[metering_pb2.StartUsageResponse, metering_pb2.StartUsageResponse]:
    """``status`` is PENDING (default) or PROCESSING; ``quantity``/``credits`` the estimate."""
    event = usage_event(
        account_id,
        event_id,
        product_id,
        endpoint=endpoint,
        status=status,
        quantity=quantity,
        credits=credits,
        start_time=start_time,
        request_metadata=request_metadata,
        webhook_url=webhook_url,
    )
    req = metering_pb2.StartUsageRequest(event=event, ttl_seconds=ttl_seconds)
    return Rpc("metering", "StartUsage", req, lambda r: r, mutating=True)


def complete_usage(
    account_id: str,
    event_id: str,
    *,
    quantity: int | None = None,
    credits: Amount | None = None,
    success: bool | None = None,
    status_code: int = 0,
    message: str = "",
    result_metadata: Mapping[str, Any] | None = None,
    complete_time: datetime | None = None,
    processing_time_ms: int = 0,
) -> Rpc[metering_pb2.CompleteUsageResponse, metering_pb2.CompleteUsageResponse]:
    req = metering_pb2.CompleteUsageRequest(
        account_id=account_id,
        event_id=event_id,
        credits="" if credits is None else to_wire(credits),
        status_code=status_code,
        message=message,
        result_metadata=to_struct(result_metadata),
        complete_time=_optional_timestamp(complete_time),
        processing_time_ms=processing_time_ms,
    )
    if quantity is not None:
        if isinstance(quantity, bool):
            raise TypeError("quantity must be an int, not bool")
        req.quantity = quantity
    if success is not None:
        req.success = success
    return Rpc("metering", "CompleteUsage", req, lambda r: r, mutating=True)


def fail_usage(
    account_id: str,
    event_id: str,
    *,
    status_code: int = 0,
    message: str = "",
    result_metadata: Mapping[str, Any] | None = None,
    complete_time: datetime | None = None,
) -> Rpc[metering_pb2.FailUsageResponse, metering_pb2.FailUsageResponse]:
    req = metering_pb2.FailUsageRequest(
        account_id=account_id,
        event_id=event_id,
        status_code=status_code,
        message=message,
        result_metadata=to_struct(result_metadata),
        complete_time=_optional_timestamp(complete_time),
    )
    return Rpc("metering", "FailUsage", req, lambda r: r, mutating=True)


def usage_range(
    preset: RangePresetArg = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
) -> metering_pb2.UsageRange:
    """The ``UsageRange`` of a usage question; ``preset`` and ``start_time``/``end_time``
    are exclusive (ValueError)."""
    _check_range(preset, start_time, end_time)
    return metering_pb2.UsageRange(
        preset=range_preset(preset),
        start_time=_optional_timestamp(start_time),
        end_time=_optional_timestamp(end_time),
    )


def get_usage(
    account_id: str,
    *,
    period: UsagePeriodArg = None,
    preset: RangePresetArg = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    product_id: str = "",
) -> Rpc[metering_pb2.GetUsageResponse, metering_pb2.GetUsageResponse]:
    """``preset`` and ``start_time``/``end_time`` are exclusive (ValueError)."""
    req = metering_pb2.GetUsageRequest(
        account_id=account_id,
        period=usage_period(period),
        time_range=usage_range(preset, start_time, end_time),
        product_id=product_id,
    )
    return Rpc("metering", "GetUsage", req, lambda r: r)


def get_usage_summary(
    account_id: str, *, recent_events: int = 0
) -> Rpc[metering_pb2.GetUsageSummaryResponse, metering_pb2.GetUsageSummaryResponse]:
    req = metering_pb2.GetUsageSummaryRequest(account_id=account_id, recent_events=recent_events)
    return Rpc("metering", "GetUsageSummary", req, lambda r: r)


def list_usage_events(
    account_id: str,
    *,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    product_id: str = "",
    page_size: int = 0,
    page_token: str = "",
    preset: RangePresetArg = None,
) -> Rpc[metering_pb2.ListUsageEventsResponse, metering_pb2.ListUsageEventsResponse]:
    """``preset`` and ``start_time``/``end_time`` are exclusive (ValueError)."""
    req = metering_pb2.ListUsageEventsRequest(
        account_id=account_id,
        time_range=usage_range(preset, start_time, end_time),
        product_id=product_id,
        page_size=page_size,
        page_token=page_token,
    )
    return Rpc("metering", "ListUsageEvents", req, lambda r: r)


def get_period_report(
    account_id: str,
    year: int,
    month: int,
    day: int = 0,
    *,
    period: UsagePeriodArg = None,
    version: int = 0,
) -> Rpc[metering_pb2.GetPeriodReportResponse, metering_pb2.PeriodReport]:
    req = metering_pb2.GetPeriodReportRequest(
        account_id=account_id,
        period=usage_period(period),
        year=year,
        month=month,
        day=day,
        version=version,
    )
    return Rpc("metering", "GetPeriodReport", req, lambda r: r.report)


def export_usage_report(
    account_id: str,
    *,
    format: ReportFormatArg = "xlsx",
    preset: RangePresetArg = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    product_id: str = "",
) -> metering_pb2.ExportUsageReportRequest:
    """The request of the server-streaming ExportUsageReport call."""
    return metering_pb2.ExportUsageReportRequest(
        account_id=account_id,
        format=report_format(format),
        time_range=usage_range(preset, start_time, end_time),
        product_id=product_id,
    )
