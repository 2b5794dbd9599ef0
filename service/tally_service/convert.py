"""Rows to protobuf messages: one builder per message. The money functions answer with
rows as JSON (`*_from_row`), reads with model objects; both reach the same builder, so a
first response and its replay, or a movement's answer and a later read, are alike."""

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

from google.protobuf import struct_pb2, timestamp_pb2

from tally.v1 import account_pb2, accounts_pb2, credits_pb2, ledger_pb2, metering_pb2
from tally_service import models, ranges, reads
from tally_service.db import UsageItem
from tally_service.money import MICROS_PER_CREDIT, format_amount
from tally_service.ranges import Range

ENTRY_TYPES = {
    "credit": ledger_pb2.ENTRY_TYPE_CREDIT,
    "debit": ledger_pb2.ENTRY_TYPE_DEBIT,
    "adjustment": ledger_pb2.ENTRY_TYPE_ADJUSTMENT,
}
ENTRY_TYPE_NAMES = {v: k for k, v in ENTRY_TYPES.items()}
RESERVATION_STATUSES = {
    "pending": credits_pb2.RESERVATION_STATUS_PENDING,
    "captured": credits_pb2.RESERVATION_STATUS_CAPTURED,
    "released": credits_pb2.RESERVATION_STATUS_RELEASED,
    "expired": credits_pb2.RESERVATION_STATUS_EXPIRED,
}
RESERVATION_STATUS_NAMES = {v: k for k, v in RESERVATION_STATUSES.items()}


from_json = models.from_json


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_time(message: timestamp_pb2.Timestamp, value: datetime) -> None:
    """`message.FromDatetime(value)` for an aware datetime, without its Python-level
    time tuple (the usage hot path sets four timestamps per event)."""
    delta = value - _EPOCH
    message.seconds = delta.days * 86400 + delta.seconds
    message.nanos = delta.microseconds * 1000


def set_micros(message: timestamp_pb2.Timestamp, micros: int) -> None:
    """Sets an instant given as integer microseconds since the Unix epoch."""
    seconds, micros = divmod(micros, 1_000_000)
    message.seconds = seconds
    message.nanos = micros * 1000


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if value:
        message.update(value)
    return message


def account(row: models.Account) -> account_pb2.Account:
    return account_pb2.Account(
        account_id=row.account_id,
        email=row.email,
        display_name=row.name,
        time_zone=row.time_zone,
        currency=row.currency,
        overdraft_limit=format_amount(row.overdraft_limit),
        trial_end_time=timestamp(row.trial_ends_at),
        create_time=timestamp(row.created_at),
        update_time=timestamp(row.updated_at),
    )


def reservation(row: models.Hold) -> credits_pb2.Reservation:
    return _reservation(
        reservation_id=str(row.reservation_id),
        account_id=row.account_id,
        status=row.status,
        amount=row.amount,
        captured=row.captured,
        reference=row.reference,
        request_id=row.request_id,
        metadata=row.metadata_,
        expires_at=row.expires_at,
        created_at=row.created_at,
        finalized_at=row.finalized_at,
    )


def reservation_from_row(row: dict[str, Any]) -> credits_pb2.Reservation:
    """`reservation()` of a hold row as PostgreSQL's to_jsonb gives it (Reserve, Capture,
    Release and StartUsage answer one), without a model object in between."""
    finalized = row.get("finalized_at")
    return _reservation(
        reservation_id=row["reservation_id"],
        account_id=row["account_id"],
        status=row["status"],
        amount=row["amount"],
        captured=row["captured"],
        reference=row["reference"],
        request_id=row["request_id"],
        metadata=row["metadata"],
        expires_at=datetime.fromisoformat(row["expires_at"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        finalized_at=datetime.fromisoformat(finalized) if finalized is not None else None,
    )


def _reservation(
    *,
    reservation_id: str,
    account_id: str,
    status: str,
    amount: int,
    captured: int,
    reference: str,
    request_id: str,
    metadata: dict[str, Any],
    expires_at: datetime,
    created_at: datetime,
    finalized_at: datetime | None,
) -> credits_pb2.Reservation:
    """The one Reservation builder, from a model object or a JSON row."""
    message = credits_pb2.Reservation(
        reservation_id=reservation_id,
        account_id=account_id,
        status=RESERVATION_STATUSES[status],
        amount=format_amount(amount),
        captured_amount=format_amount(captured),
        reference=reference,
        request_id=request_id,
    )
    message.metadata.SetInParent()  # present even when empty
    message.metadata.update(metadata)
    set_time(message.expire_time, expires_at)
    set_time(message.create_time, created_at)
    if finalized_at is not None:
        set_time(message.finalize_time, finalized_at)
    return message


def entry(row: models.LedgerEntry) -> ledger_pb2.LedgerEntry:
    return _entry(
        entry_id=row.entry_id,
        account_id=row.account_id,
        sequence=row.sequence,
        entry_type=row.entry_type,
        amount=row.amount,
        balance_after=row.balance_after,
        description=row.description,
        reference=row.reference,
        request_id=row.request_id,
        reservation_id=str(row.reservation_id) if row.reservation_id else "",
        metadata=row.metadata_,
        created_at=row.created_at,
    )


def entry_from_row(row: dict[str, Any]) -> ledger_pb2.LedgerEntry:
    """`entry()` of a ledger entry row as PostgreSQL's to_jsonb gives it (the money
    functions' answers; the usage hot path builds one per event), without a model
    object in between."""
    return _entry(
        entry_id=row["entry_id"],
        account_id=row["account_id"],
        sequence=row["sequence"],
        entry_type=row["entry_type"],
        amount=row["amount"],
        balance_after=row["balance_after"],
        description=row["description"],
        reference=row["reference"],
        request_id=row["request_id"],
        reservation_id=row.get("reservation_id") or "",
        metadata=row["metadata"],
        created_at=datetime.fromisoformat(row["created_at"]),
    )


def _entry(
    *,
    entry_id: int,
    account_id: str,
    sequence: int,
    entry_type: str,
    amount: int,
    balance_after: int,
    description: str,
    reference: str,
    request_id: str,
    reservation_id: str,
    metadata: dict[str, Any],
    created_at: datetime,
) -> ledger_pb2.LedgerEntry:
    """The one LedgerEntry builder, from a model object or a JSON row."""
    message = ledger_pb2.LedgerEntry(
        entry_id=entry_id,
        account_id=account_id,
        sequence=sequence,
        type=ENTRY_TYPES[entry_type],
        amount=format_amount(amount),
        balance_after=format_amount(balance_after),
        description=description,
        reference=reference,
        request_id=request_id,
        reservation_id=reservation_id,
    )
    message.metadata.SetInParent()  # present even when empty
    message.metadata.update(metadata)
    set_time(message.create_time, created_at)
    return message


USAGE_STATUSES = {
    "pending": metering_pb2.USAGE_STATUS_PENDING,
    "processing": metering_pb2.USAGE_STATUS_PROCESSING,
    "completed": metering_pb2.USAGE_STATUS_COMPLETED,
    "failed": metering_pb2.USAGE_STATUS_FAILED,
}
CREDIT_TYPES = {
    "subscription": metering_pb2.CREDIT_TYPE_SUBSCRIPTION,
    "purchased": metering_pb2.CREDIT_TYPE_PURCHASED,
}


def auto_reload(a: models.Account) -> credits_pb2.AutoReloadSettings:
    return credits_pb2.AutoReloadSettings(
        enabled=a.auto_reload_enabled,
        threshold=format_amount(a.auto_reload_threshold),
        amount=format_amount(a.auto_reload_amount),
        max_reloads_per_day=a.auto_reload_max_per_day,
        max_amount_per_month=format_amount(a.auto_reload_max_per_month),
        disabled_reason=a.auto_reload_disabled_reason,
    )


def credit_balance(b: reads.Balance) -> credits_pb2.CreditBalance:
    a = b.account
    return credits_pb2.CreditBalance(
        account_id=a.account_id,
        balance=format_amount(a.balance),
        reserved=format_amount(b.reserved),
        available=format_amount(a.balance - b.reserved),
        currency=a.currency,
        update_time=timestamp(b.update_time),
        auto_reload=auto_reload(a),
        overdraft_limit=format_amount(a.overdraft_limit),
        subscription_credits=format_amount(b.subscription_credits),
        purchased_credits=format_amount(b.purchased_credits),
    )


def credit_balance_at(b: reads.BalanceAt) -> credits_pb2.CreditBalance:
    """The balance at a past instant: grant totals are not kept per instant, so
    subscription_credits and purchased_credits stay empty."""
    a = b.account
    return credits_pb2.CreditBalance(
        account_id=a.account_id,
        balance=format_amount(b.balance),
        reserved=format_amount(b.reserved),
        available=format_amount(b.balance - b.reserved),
        currency=a.currency,
        update_time=timestamp(b.update_time),
        auto_reload=auto_reload(a),
        overdraft_limit=format_amount(a.overdraft_limit),
    )


GRANT_TYPES = {
    "purchased": credits_pb2.CREDIT_GRANT_TYPE_PURCHASED,
    "subscription": credits_pb2.CREDIT_GRANT_TYPE_SUBSCRIPTION,
    "promotional": credits_pb2.CREDIT_GRANT_TYPE_PROMOTIONAL,
    "auto_reload": credits_pb2.CREDIT_GRANT_TYPE_AUTO_RELOAD,
}
GRANT_TYPE_NAMES = {v: k for k, v in GRANT_TYPES.items()}
RELOAD_STATUSES = {
    "pending": credits_pb2.RELOAD_STATUS_PENDING,
    "succeeded": credits_pb2.RELOAD_STATUS_SUCCEEDED,
    "failed": credits_pb2.RELOAD_STATUS_FAILED,
    "skipped": credits_pb2.RELOAD_STATUS_SKIPPED,
}
SUBSCRIPTION_PERIODS = {
    "monthly": accounts_pb2.SUBSCRIPTION_PERIOD_MONTHLY,
    "yearly": accounts_pb2.SUBSCRIPTION_PERIOD_YEARLY,
}
SUBSCRIPTION_PERIOD_NAMES = {v: k for k, v in SUBSCRIPTION_PERIODS.items()}


def grant(row: models.Grant) -> credits_pb2.CreditGrant:
    return credits_pb2.CreditGrant(
        grant_id=str(row.grant_id),
        account_id=row.account_id,
        type=GRANT_TYPES[row.grant_type],
        amount=format_amount(row.amount),
        remaining=format_amount(row.remaining),
        priority=row.priority,
        expire_time=timestamp(row.expires_at),
        create_time=timestamp(row.created_at),
        entry_id=row.entry_id,
    )


def reload_intent(row: models.ReloadIntent) -> credits_pb2.ReloadIntent:
    return credits_pb2.ReloadIntent(
        intent_id=str(row.intent_id),
        account_id=row.account_id,
        status=RELOAD_STATUSES[row.status],
        amount=format_amount(row.amount),
        attempts=row.attempts,
        error=row.error,
        create_time=timestamp(row.created_at),
        finish_time=timestamp(row.finished_at),
        entry_id=row.entry_id or 0,
        charge_id=row.charge_id,
    )


THRESHOLD_METRICS = {
    "available_credit": credits_pb2.THRESHOLD_METRIC_AVAILABLE_CREDIT,
    "usage_credits": credits_pb2.THRESHOLD_METRIC_USAGE_CREDITS,
    "usage_requests": credits_pb2.THRESHOLD_METRIC_USAGE_REQUESTS,
}
THRESHOLD_METRIC_NAMES = {v: k for k, v in THRESHOLD_METRICS.items()}
THRESHOLD_PERIODS = {
    "day": credits_pb2.THRESHOLD_PERIOD_DAY,
    "month": credits_pb2.THRESHOLD_PERIOD_MONTH,
}
THRESHOLD_PERIOD_NAMES = {v: k for k, v in THRESHOLD_PERIODS.items()}
NOTIFICATION_STATUSES = {
    "pending": credits_pb2.NOTIFICATION_STATUS_PENDING,
    "delivered": credits_pb2.NOTIFICATION_STATUS_DELIVERED,
}


def metric_value(metric: str, value: int) -> str:
    """A threshold's number in its metric's unit: requests whole, credits decimal."""
    return str(value) if metric == "usage_requests" else format_amount(value)


def threshold(row: models.Threshold) -> credits_pb2.Threshold:
    return credits_pb2.Threshold(
        threshold_id=str(row.threshold_id),
        account_id=row.account_id,
        metric=THRESHOLD_METRICS[row.metric],
        value=metric_value(row.metric, row.value),
        percent=row.percent,
        period=THRESHOLD_PERIODS.get(row.period or "", credits_pb2.THRESHOLD_PERIOD_UNSPECIFIED),
        fire_at=metric_value(row.metric, row.fire_at),
        create_time=timestamp(row.created_at),
        delete_time=timestamp(row.deleted_at),
    )


def notification(row: models.Notification) -> credits_pb2.Notification:
    return credits_pb2.Notification(
        notification_id=str(row.notification_id),
        account_id=row.account_id,
        threshold_id=str(row.threshold_id),
        metric=THRESHOLD_METRICS[row.metric],
        observed=metric_value(row.metric, row.observed),
        threshold=metric_value(row.metric, row.fire_at),
        crossed_at=timestamp(row.crossed_at),
        period_start=timestamp(row.period_start),
        status=NOTIFICATION_STATUSES[row.status],
        attempts=row.attempts,
        error=row.error,
        deliver_time=timestamp(row.delivered_at),
    )


def subscription(row: models.Subscription | None) -> accounts_pb2.Subscription:
    if row is None:
        return accounts_pb2.Subscription(
            status=accounts_pb2.SUBSCRIPTION_STATUS_NONE, credits_per_period="0"
        )
    return accounts_pb2.Subscription(
        plan=row.plan,
        status=accounts_pb2.SUBSCRIPTION_STATUS_ACTIVE,
        credits_per_period=format_amount(row.credits_per_period),
        current_period_start_time=timestamp(row.period_started_at),
        current_period_end_time=timestamp(row.renews_at),
        period=SUBSCRIPTION_PERIODS[row.period],
        anchor_time=timestamp(row.anchor_at),
        rollover=row.rollover,
    )


def product(row: models.Product) -> metering_pb2.Product:
    return metering_pb2.Product(
        product_id=row.product_id,
        display_name=row.display_name,
        credits_per_unit=format_amount(row.credits_per_unit),
        charge_failed=row.charge_failed,
        minimum_charge=format_amount(row.minimum_charge),
        create_time=timestamp(row.created_at),
        update_time=timestamp(row.updated_at),
    )


def usage_event(
    row: models.UsageEvent, hold_expires_at: datetime | None = None
) -> metering_pb2.UsageEvent:
    status, success, message, completed = row.status, row.success, row.message, row.completed_at
    if (
        status in ("pending", "processing")
        and hold_expires_at is not None
        and hold_expires_at <= datetime.now(hold_expires_at.tzinfo)
    ):
        # Its hold expired at that instant; the sweeper will write it down.
        status, success, message, completed = "failed", False, "EXPIRED", hold_expires_at
    return metering_pb2.UsageEvent(
        account_id=row.account_id,
        event_id=row.event_id,
        product_id=row.product_id,
        endpoint=row.endpoint,
        status=USAGE_STATUSES[status],
        success=success,
        status_code=row.status_code,
        message=message,
        quantity=row.quantity,
        credits=format_amount(row.credits),
        credit_type=CREDIT_TYPES.get(row.credit_type, metering_pb2.CREDIT_TYPE_UNSPECIFIED),
        start_time=timestamp(row.started_at),
        complete_time=timestamp(completed),
        processing_time_ms=row.processing_time_ms,
        request_metadata=struct(row.request_metadata),
        result_metadata=struct(row.result_metadata),
        webhook_url=row.webhook_url,
        create_time=timestamp(row.created_at),
        entry_id=row.entry_id or 0,
        reservation_id=str(row.reservation_id) if row.reservation_id else "",
    )


class Written:
    """Positions in a result row of an event `tally_record_usage` wrote (sql/80_usage.sql):
    [index, of, duplicate, credits, credit_type, created_at, entry_id, sequence,
    balance_after, entry_created_at, product_id, status]; the instants are integer
    microseconds since the Unix epoch."""

    INDEX, OF, DUPLICATE, CREDITS, CREDIT_TYPE, CREATED_AT = range(6)
    ENTRY_ID, SEQUENCE, BALANCE_AFTER, ENTRY_CREATED_AT, PRODUCT_ID, STATUS = range(6, 12)


def usage_replayed(result: dict[str, Any]) -> metering_pb2.RecordUsageResponse:
    """A response from full rows (an event recorded before, a finished job)."""
    message = metering_pb2.RecordUsageResponse(
        event=usage_event(from_json(models.UsageEvent, result["event"])),
        duplicate=bool(result.get("duplicate")),
    )
    if result.get("entry"):
        message.entry.CopyFrom(entry_from_row(result["entry"]))
    return message


def usage_written(
    row: list[Any], event: metering_pb2.UsageEvent, item: UsageItem, caller: str
) -> metering_pb2.RecordUsageResponse:
    """The response for an event written by this call (see `WrittenUsage.fill`)."""
    message = metering_pb2.RecordUsageResponse()
    WrittenUsage(caller).fill(message, row, event, item)
    return message


class WrittenUsage:
    """Builds the responses of the events one call wrote: the same messages a later replay
    builds from the stored rows (`usage_replayed`). What the call's events share is made
    once per call: each entry starts as a copy of its (account, product, endpoint)'s
    template (type, account, description, metadata but the event id), and each charge's
    decimal text is formatted once. `caller` is the caller the ledger_entries_caller
    trigger stamped."""

    def __init__(self, caller: str) -> None:
        self.caller = caller
        self._entries: dict[tuple[str, str, str], ledger_pb2.LedgerEntry] = {}
        self._credits: dict[int, str] = {}

    def _entry(self, item: UsageItem) -> ledger_pb2.LedgerEntry:
        key = (item.account_id, item.product_id, item.endpoint)
        template = self._entries.get(key)
        if template is None:
            product, endpoint = item.product_id, item.endpoint
            # The debit tally_record_usage writes (same description, reference and
            # metadata; the caller as the ledger_entries_caller trigger stamps it).
            template = self._entries[key] = ledger_pb2.LedgerEntry(
                account_id=item.account_id,
                type=ledger_pb2.ENTRY_TYPE_DEBIT,
                description=f"usage {product} {endpoint}" if endpoint else f"usage {product}",
            )
            fields = template.metadata.fields
            fields["event_id"].string_value = ""
            fields["product_id"].string_value = product
            if self.caller:
                fields["caller"].string_value = self.caller
        return template

    def fill(
        self,
        message: metering_pb2.RecordUsageResponse,
        row: list[Any],
        event: metering_pb2.UsageEvent,
        item: UsageItem,
    ) -> None:
        """Fills `message` (empty; in place, e.g. a batch response's result, so nothing
        is copied) with the response for an event written by this call, from the event
        as sent (`event` and its `item`: the one that was written, of which this result
        may be a duplicate) and what the database decided (`row`, see `Written`)."""
        self.begin(message, event, item)
        self.finish(message, row, item)

    def begin(
        self,
        message: metering_pb2.RecordUsageResponse,
        event: metering_pb2.UsageEvent,
        item: UsageItem,
    ) -> None:
        """The part of `fill` that the event as sent decides (a batch builds it while
        its events are in the database)."""
        out = message.event
        out.CopyFrom(event)
        out.DiscardUnknownFields()
        out.request_metadata.SetInParent()  # present even when empty, as in a replay
        out.result_metadata.SetInParent()
        out.status = USAGE_STATUSES[item.status]
        out.success = item.success
        out.quantity = item.quantity
        set_time(out.start_time, item.started_at)
        if item.completed_at is None:
            out.ClearField("complete_time")
        else:
            set_time(out.complete_time, item.completed_at)
        out.processing_time_ms = item.processing_time_ms
        out.reservation_id = ""

    def finish(
        self, message: metering_pb2.RecordUsageResponse, row: list[Any], item: UsageItem
    ) -> None:
        """The part of `fill` that the database decided (`row`), after `begin`."""
        message.duplicate = row[Written.DUPLICATE]
        out = message.event
        charge: int = row[Written.CREDITS]
        credits = self._credits.get(charge)
        if credits is None:
            credits = self._credits[charge] = format_amount(charge)
        out.credits = credits
        out.credit_type = CREDIT_TYPES[row[Written.CREDIT_TYPE]]
        set_micros(out.create_time, row[Written.CREATED_AT])
        entry_id = row[Written.ENTRY_ID]
        out.entry_id = entry_id or 0
        if entry_id:
            entry = message.entry
            entry.CopyFrom(self._entry(item))
            entry.entry_id = entry_id
            entry.sequence = row[Written.SEQUENCE]
            entry.amount = f"-{credits}" if charge > 0 else format_amount(-charge)
            entry.balance_after = format_amount(row[Written.BALANCE_AFTER])
            entry.reference = item.event_id
            entry.request_id = item.event_id
            entry.metadata.fields["event_id"].string_value = item.event_id
            set_micros(entry.create_time, row[Written.ENTRY_CREATED_AT])


def period_report_line(line: reads.ReportLine) -> metering_pb2.PeriodReportLine:
    t = line.totals
    return metering_pb2.PeriodReportLine(
        product_id=line.product_id,
        endpoint=line.endpoint,
        total_requests=t.requests,
        successful_requests=t.successful,
        failed_requests=t.failed,
        credits_consumed=format_amount(t.credits),
        quantity=t.quantity,
    )


REPORT_PERIODS = {
    "day": metering_pb2.USAGE_PERIOD_DAILY,
    "month": metering_pb2.USAGE_PERIOD_MONTHLY,
}


def period_report(report: reads.PeriodReportVersion) -> metering_pb2.PeriodReport:
    """One version of a period report; its totals are those of its lines."""
    return metering_pb2.PeriodReport(
        account_id=report.account_id,
        period=REPORT_PERIODS[report.unit],
        time_zone=report.time_zone,
        version=report.version,
        latest_version=report.latest_version,
        create_time=timestamp(report.created_at),
        totals=usage_totals(report.total(), report.start, report.end),
        lines=[period_report_line(line) for line in report.lines],
        changes=[period_report_line(line) for line in report.changes],
    )


def average_credits(credits: int, requests: int) -> str:
    if not requests:
        return "0"
    value = (Decimal(credits) / MICROS_PER_CREDIT / requests).quantize(
        Decimal("0.000001"), rounding=ROUND_HALF_EVEN
    )
    return format_amount(int(value * MICROS_PER_CREDIT))


def usage_totals(t: reads.Totals, start: datetime, end: datetime) -> metering_pb2.UsageTotals:
    return metering_pb2.UsageTotals(
        period_start=timestamp(start),
        period_end=timestamp(end),
        total_requests=t.requests,
        successful_requests=t.successful,
        failed_requests=t.failed,
        credits_consumed=format_amount(t.credits),
        quantity=t.quantity,
        average_credits_per_request=average_credits(t.credits, t.requests),
    )


def usage(
    account_id: str, period: int, r: Range, unit: str, zone: ZoneInfo, s: reads.Stats
) -> metering_pb2.GetUsageResponse:
    """GetUsage's answer: the statistics `s` of the range `r`, in buckets of `unit` (the
    `period` asked for) in the account's time zone."""
    response = metering_pb2.GetUsageResponse(
        account_id=account_id,
        period=cast(
            metering_pb2.UsagePeriod.ValueType, period or metering_pb2.USAGE_PERIOD_MONTHLY
        ),
        totals=usage_totals(s.total, r.start, r.end),
    )
    for endpoint, t in s.by_endpoint.items():
        response.requests_by_endpoint[endpoint] = t.requests
    for product, t in s.by_product.items():
        response.requests_by_product[product] = t.requests
        response.credits_by_product[product] = format_amount(t.credits)
    starts = ranges.period_starts(r, unit, zone)
    # Each period's bounds: its local start's instant (once each), clipped to the range.
    bounds = [max(r.start, ranges.midnight(local.date(), zone)) for local in starts]
    bounds.append(r.end)
    for i, local_start in enumerate(starts):
        t = s.by_period.get(local_start, reads.Totals())
        response.buckets.append(usage_totals(t, bounds[i], min(r.end, bounds[i + 1])))
    return response
