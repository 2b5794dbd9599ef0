"""``tallyctl``: operator command line for a Tally server.

Exit status: 0 on success, 1 when the server answers with an error (printed to
stderr as ``error: <CODE> <reason>: <message>`` plus field violations), 2 for a
usage error, 3 when ``verify`` finds the account inconsistent (also in ``--help``).

``-o json`` prints every answer as protobuf JSON (``MessageToJson``); ``--version``.

Metering: ``products upsert|list``, ``usage`` (statistics), ``usage record``
(record one event), ``usage-events`` (the rows of the usage report), ``export``
(a CSV or XLSX report to a file, with progress on a terminal), ``summary``
(the account overview) and ``period-report`` (the versioned report of a closed day
or month).

Grants and plans: ``topup --grant-type/--expires/--priority``, ``grants`` (the
account's credit grants in draw order), ``auto-reload`` (set or ``--disable`` the
rule), ``reloads`` (reload intents, newest first), ``subscribe`` and
``unsubscribe``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from itertools import islice
from typing import Any, TextIO

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from tally.v1 import account_pb2, accounts_pb2, credits_pb2, ledger_pb2, metering_pb2

from . import _requests as rq
from .amounts import from_wire
from .client import DEFAULT_TIMEOUT_SECONDS, TallyClient
from .errors import TallyError

__all__ = ["DEFAULT_TARGET", "format_fields", "format_table", "main"]

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_OK, EXIT_ERROR, EXIT_INCONSISTENT = 0, 1, 3

# --- formatting ---------------------------------------------------------------


def format_table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, right: Collection[int] = ()
) -> str:
    """Columns padded to a common width; column indexes in ``right`` right-aligned."""
    body = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def format_fields(pairs: Iterable[tuple[str, str]]) -> str:
    """``name: value`` lines with the values aligned."""
    items = list(pairs)
    width = max((len(k) for k, _ in items), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}".rstrip() for k, v in items)


def iso(ts: timestamp_pb2.Timestamp) -> str:
    """ISO-8601 UTC (``2024-05-01T12:00:00Z``); ``-`` for an unset timestamp."""
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def _struct(s: struct_pb2.Struct) -> str:
    if not s.fields:
        return ""
    return json.dumps(json_format.MessageToDict(s), sort_keys=True, separators=(",", ":"))


def _type_name(t: ledger_pb2.EntryType.ValueType) -> str:
    try:
        return ledger_pb2.EntryType.Name(t).removeprefix("ENTRY_TYPE_").lower()
    except ValueError:
        return str(t)


def _account_fields(a: account_pb2.Account) -> list[tuple[str, str]]:
    return [
        ("account_id", a.account_id),
        ("display_name", a.display_name),
        ("email", a.email),
        ("currency", a.currency),
        ("time_zone", a.time_zone),
        ("overdraft_limit", a.overdraft_limit),
        ("trial_end_time", iso(a.trial_end_time)),
        ("create_time", iso(a.create_time)),
        ("update_time", iso(a.update_time)),
    ]


def _entry_fields(e: ledger_pb2.LedgerEntry) -> list[tuple[str, str]]:
    fields = [
        ("entry_id", str(e.entry_id)),
        ("account_id", e.account_id),
        ("sequence", str(e.sequence)),
        ("type", _type_name(e.type)),
        ("amount", e.amount),
        ("balance_after", e.balance_after),
        ("description", e.description),
        ("reference", e.reference),
        ("create_time", iso(e.create_time)),
        ("request_id", e.request_id),
    ]
    if e.reservation_id:
        fields.append(("reservation_id", e.reservation_id))
    if e.metadata.fields:
        fields.append(("metadata", _struct(e.metadata)))
    return fields


def _no_limit(value: str) -> str:
    """A cap as shown: ``no limit`` for 0 or empty."""
    try:
        unlimited = not value or from_wire(value) == 0
    except ValueError:
        unlimited = False
    return "no limit" if unlimited else value


def _auto_reload_fields(r: credits_pb2.AutoReloadSettings) -> list[tuple[str, str]]:
    return [
        ("auto_reload", f"on: add {r.amount} below {r.threshold}" if r.enabled else "off"),
        ("auto_reload_max_per_day", _no_limit(str(r.max_reloads_per_day))),
        ("auto_reload_max_per_month", _no_limit(r.max_amount_per_month)),
        ("auto_reload_disabled_reason", r.disabled_reason or "-"),
    ]


def _balance_fields(b: credits_pb2.CreditBalance) -> list[tuple[str, str]]:
    fields = [
        ("account_id", b.account_id),
        ("currency", b.currency),
        ("balance", b.balance),
        ("reserved", b.reserved),
        ("available", b.available),
        ("subscription_credits", b.subscription_credits),
        ("purchased_credits", b.purchased_credits),
        ("overdraft_limit", b.overdraft_limit),
        ("update_time", iso(b.update_time)),
    ]
    fields.extend(_auto_reload_fields(b.auto_reload))
    return fields


def _subscription_fields(s: accounts_pb2.Subscription) -> list[tuple[str, str]]:
    return [
        ("plan", s.plan or "-"),
        ("status", _enum_name(accounts_pb2.SubscriptionStatus, "SUBSCRIPTION_STATUS_", s.status)),
        ("credits_per_period", s.credits_per_period),
        ("period", _enum_name(accounts_pb2.SubscriptionPeriod, "SUBSCRIPTION_PERIOD_", s.period)),
        ("rollover", "yes" if s.rollover else "no"),
        ("anchor_time", iso(s.anchor_time)),
        ("current_period_start", iso(s.current_period_start_time)),
        ("current_period_end", iso(s.current_period_end_time)),
    ]


def _enum_name(enum: Any, prefix: str, value: int) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _product_row(p: metering_pb2.Product) -> list[str]:
    return [
        p.product_id,
        p.display_name,
        p.credits_per_unit,
        p.minimum_charge,
        "yes" if p.charge_failed else "no",
        iso(p.update_time),
    ]


_PRODUCT_HEADERS = [
    "PRODUCT_ID",
    "DISPLAY_NAME",
    "CREDITS_PER_UNIT",
    "MINIMUM_CHARGE",
    "CHARGE_FAILED",
    "UPDATED",
]


def _totals_fields(t: metering_pb2.UsageTotals) -> list[tuple[str, str]]:
    return [
        ("period_start", iso(t.period_start)),
        ("period_end", iso(t.period_end)),
        ("total_requests", str(t.total_requests)),
        ("successful_requests", str(t.successful_requests)),
        ("failed_requests", str(t.failed_requests)),
        ("credits_consumed", t.credits_consumed),
        ("quantity", str(t.quantity)),
        ("average_credits_per_request", t.average_credits_per_request),
    ]


def _usage_tables(u: metering_pb2.GetUsageResponse) -> str:
    """By endpoint, by product and the buckets of a GetUsage answer, as tables."""
    endpoints = sorted(u.requests_by_endpoint.items(), key=lambda kv: (-kv[1], kv[0]))
    by_endpoint = format_table(
        ["ENDPOINT", "REQUESTS"], [[k or "-", str(v)] for k, v in endpoints], right={1}
    )
    products = sorted(set(u.requests_by_product) | set(u.credits_by_product))
    by_product = format_table(
        ["PRODUCT_ID", "REQUESTS", "CREDITS"],
        [
            [p, str(u.requests_by_product.get(p, 0)), u.credits_by_product.get(p, "0")]
            for p in products
        ],
        right={1, 2},
    )
    buckets = format_table(
        ["START", "END", "REQUESTS", "SUCCESSFUL", "FAILED", "CREDITS", "QUANTITY", "AVERAGE"],
        [
            [
                iso(b.period_start),
                iso(b.period_end),
                str(b.total_requests),
                str(b.successful_requests),
                str(b.failed_requests),
                b.credits_consumed,
                str(b.quantity),
                b.average_credits_per_request,
            ]
            for b in u.buckets
        ],
        right={2, 3, 4, 5, 6, 7},
    )
    return "\n\n".join(
        [
            "By endpoint:\n" + by_endpoint,
            "By product:\n" + by_product,
            "By " + _period_word(u.period) + ":\n" + buckets,
        ]
    )


def _period_word(period: int) -> str:
    if period == metering_pb2.USAGE_PERIOD_DAILY:
        return "day"
    if period == metering_pb2.USAGE_PERIOD_YEARLY:
        return "year"
    return "month"


def _event_status(e: metering_pb2.UsageEvent) -> str:
    """The lifecycle status, with the caller's status code when there is one."""
    name = _enum_name(metering_pb2.UsageStatus, "USAGE_STATUS_", e.status)
    return f"{name} {e.status_code}" if e.status_code else name


# --- output ---------------------------------------------------------------------


def _json_output(a: argparse.Namespace, out: TextIO, message: Message) -> bool:
    """With ``-o json``: print ``message`` as protobuf JSON (``MessageToJson``) and say so."""
    if a.output != "json":
        return False
    print(json_format.MessageToJson(message), file=out)
    return True


def _emit(a: argparse.Namespace, out: TextIO, message: Message, text: Callable[[], str]) -> None:
    """``message`` as protobuf JSON with ``-o json``, else ``text()``."""
    if not _json_output(a, out, message):
        print(text(), file=out)


def human_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB``, ..."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class _Progress:
    """One status line on a terminal (stderr), rewritten at most ten times a second."""

    INTERVAL_SECONDS = 0.1

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = False
        self.last = 0.0
        self.line = ""

    def update(self, rows: int | None, written: int) -> None:
        self.line = f"export: {human_bytes(written)}"
        if rows is not None:
            self.line = f"export: {rows:,} rows, {human_bytes(written)}"
        now = time.monotonic()
        if now - self.last >= self.INTERVAL_SECONDS:
            self._show()
            self.last = now

    def _show(self) -> None:
        self.stream.write("\r" + self.line + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.line:
            self._show()  # the final totals
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


# --- commands -------------------------------------------------------------------

Command = Callable[[TallyClient, argparse.Namespace, TextIO], int]


def _period(value: str) -> tuple[str, int, int, int]:
    """argparse type: ``YYYY-MM`` (a month) or ``YYYY-MM-DD`` (a day), as
    (period, year, month, day)."""
    parts = value.split("-")
    if len(parts) in (2, 3) and all(p.isdigit() for p in parts):
        numbers = [int(p) for p in parts]
        if len(numbers) == 2:
            return "monthly", numbers[0], numbers[1], 0
        return "daily", numbers[0], numbers[1], numbers[2]
    raise argparse.ArgumentTypeError(f"not YYYY-MM or YYYY-MM-DD: {value!r}")


def _parse_time(value: str) -> datetime:
    """argparse type: an ISO-8601 instant with a UTC offset (or ``Z``)."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r}") from None
    if dt.tzinfo is None:
        raise argparse.ArgumentTypeError(f"time needs a UTC offset or Z: {value!r}")
    return dt


def _grant_type(value: str) -> str:
    """argparse type: a grant type name such as ``promotional`` (kept as given)."""
    try:
        rq.credit_grant_type(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _non_negative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value!r}")
    return n


def _cmd_accounts_create(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    account = c.create_account(
        a.account_id,
        email=a.email,
        display_name=a.display_name,
        time_zone=a.time_zone,
        currency=a.currency,
        overdraft_limit=a.overdraft_limit,
        trial_end_time=a.trial_end,
        request_id=a.request_id,
    )
    _emit(a, out, account, lambda: format_fields(_account_fields(account)))
    return EXIT_OK


def _cmd_accounts_get(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    account = c.get_account(a.account_id)
    _emit(a, out, account, lambda: format_fields(_account_fields(account)))
    return EXIT_OK


def _cmd_accounts_list(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    accounts = c.iter_accounts(page_size=min(a.limit, 100) if a.limit else 0)
    if a.limit:
        accounts = islice(accounts, a.limit)
    listed = list(accounts)
    if _json_output(a, out, accounts_pb2.ListAccountsResponse(accounts=listed)):
        return EXIT_OK
    rows = [
        [
            x.account_id,
            x.display_name,
            x.email,
            x.currency,
            x.overdraft_limit,
            x.time_zone,
            iso(x.create_time),
        ]
        for x in listed
    ]
    headers = [
        "ACCOUNT_ID",
        "DISPLAY_NAME",
        "EMAIL",
        "CURRENCY",
        "OVERDRAFT",
        "TIME_ZONE",
        "CREATED",
    ]
    print(format_table(headers, rows, right={4}), file=out)
    return EXIT_OK


def _cmd_movement(kind: str) -> Command:
    def run(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
        if kind == "topup":
            entry = c.top_up(
                a.account_id,
                a.amount,
                description=a.description,
                reference=a.reference,
                grant_type=a.grant_type,
                expire_time=a.expires,
                priority=a.priority,
                request_id=a.request_id,
            )
        elif kind == "debit":
            entry = c.debit(
                a.account_id,
                a.amount,
                description=a.description,
                reference=a.reference,
                request_id=a.request_id,
            )
        else:
            entry = c.adjust(
                a.account_id, a.amount, a.reason, reference=a.reference, request_id=a.request_id
            )
        _emit(a, out, entry, lambda: format_fields(_entry_fields(entry)))
        return EXIT_OK

    return run


def _cmd_balance(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    balance = c.get_balance(a.account_id, as_of=a.as_of)
    _emit(a, out, balance, lambda: format_fields(_balance_fields(balance)))
    return EXIT_OK


def _cmd_grants(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    grants = c.list_grants(a.account_id, include_spent=a.all)
    if _json_output(a, out, credits_pb2.ListGrantsResponse(grants=grants)):
        return EXIT_OK
    rows = [
        [
            _enum_name(credits_pb2.CreditGrantType, "CREDIT_GRANT_TYPE_", g.type),
            g.amount,
            g.remaining,
            str(g.priority),
            iso(g.expire_time),
            iso(g.create_time),
        ]
        for g in grants
    ]
    headers = ["TYPE", "AMOUNT", "REMAINING", "PRIORITY", "EXPIRES", "CREATED"]
    print(format_table(headers, rows, right={1, 2, 3}), file=out)
    return EXIT_OK


def _cmd_auto_reload(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    settings = c.set_auto_reload(
        a.account_id,
        enabled=not a.disable,
        threshold=a.threshold or "0",
        amount=a.amount or "0",
        max_reloads_per_day=a.max_per_day,
        max_amount_per_month=a.max_per_month,
        request_id=a.request_id,
    )
    fields = [("account_id", a.account_id), *_auto_reload_fields(settings)]
    _emit(a, out, settings, lambda: format_fields(fields))
    return EXIT_OK


def _cmd_reloads(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    intents = c.iter_reloads(a.account_id, page_size=min(a.limit, 100) if a.limit else 0)
    if a.limit:
        intents = islice(intents, a.limit)
    listed = list(intents)
    if _json_output(a, out, credits_pb2.ListReloadsResponse(reloads=listed)):
        return EXIT_OK
    rows = [
        [
            r.intent_id,
            _enum_name(credits_pb2.ReloadStatus, "RELOAD_STATUS_", r.status),
            r.amount,
            str(r.attempts),
            r.error,
            iso(r.create_time),
            iso(r.finish_time),
        ]
        for r in listed
    ]
    headers = ["INTENT_ID", "STATUS", "AMOUNT", "ATTEMPTS", "ERROR", "CREATED", "FINISHED"]
    print(format_table(headers, rows, right={2, 3}), file=out)
    return EXIT_OK


def _cmd_subscribe(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    sub = c.set_subscription(
        a.account_id,
        a.plan,
        a.credits,
        period=a.period,
        anchor_time=a.anchor,
        rollover=a.rollover,
        request_id=a.request_id,
    )
    fields = [("account_id", a.account_id), *_subscription_fields(sub)]
    _emit(a, out, sub, lambda: format_fields(fields))
    return EXIT_OK


def _cmd_unsubscribe(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    sub = c.cancel_subscription(a.account_id, request_id=a.request_id)
    fields = [("account_id", a.account_id), *_subscription_fields(sub)]
    _emit(a, out, sub, lambda: format_fields(fields))
    return EXIT_OK


def _cmd_ledger(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    entries = c.iter_entries(
        a.account_id,
        type=a.type,
        start_time=a.start,
        end_time=a.end,
        page_size=min(a.limit, 100) if a.limit else 0,
    )
    if a.limit:
        entries = islice(entries, a.limit)
    listed = list(entries)
    if _json_output(a, out, ledger_pb2.ListEntriesResponse(entries=listed)):
        return EXIT_OK
    rows = [
        [
            str(e.entry_id),
            str(e.sequence),
            _type_name(e.type),
            e.amount,
            e.balance_after,
            iso(e.create_time),
            e.reference,
            e.description,
        ]
        for e in listed
    ]
    headers = [
        "ENTRY_ID",
        "SEQ",
        "TYPE",
        "AMOUNT",
        "BALANCE_AFTER",
        "CREATED",
        "REFERENCE",
        "DESCRIPTION",
    ]
    print(format_table(headers, rows, right={0, 1, 3, 4}), file=out)
    return EXIT_OK


def _cmd_verify(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    r = c.verify_account(a.account_id)
    if _json_output(a, out, r):
        return EXIT_OK if r.consistent else EXIT_INCONSISTENT
    fields = [
        ("account_id", a.account_id),
        ("consistent", "yes" if r.consistent else "NO"),
        ("stored_balance", r.stored_balance),
        ("ledger_balance", r.ledger_balance),
        ("stored_reserved", r.stored_reserved),
        ("holds_reserved", r.holds_reserved),
        ("entry_count", str(r.entry_count)),
    ]
    print(format_fields(fields), file=out)
    for v in r.violations:
        print(f"  - {v}", file=out)
    return EXIT_OK if r.consistent else EXIT_INCONSISTENT


def _cmd_products_upsert(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    product = c.upsert_product(
        a.product_id,
        a.credits_per_unit,
        display_name=a.display_name,
        charge_failed=a.charge_failed,
        minimum_charge=a.minimum_charge,
        request_id=a.request_id,
    )
    _emit(
        a,
        out,
        product,
        lambda: format_fields(zip(_PRODUCT_HEADERS, _product_row(product), strict=True)),
    )
    return EXIT_OK


def _cmd_products_list(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    products = c.iter_products(page_size=min(a.limit, 100) if a.limit else 0)
    if a.limit:
        products = islice(products, a.limit)
    listed = list(products)
    if _json_output(a, out, metering_pb2.ListProductsResponse(products=listed)):
        return EXIT_OK
    rows = [_product_row(p) for p in listed]
    print(format_table(_PRODUCT_HEADERS, rows, right={2, 3}), file=out)
    return EXIT_OK


def _cmd_usage(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    u = c.get_usage(
        a.account_id,
        period=a.period,
        preset=a.preset,
        start_time=a.start,
        end_time=a.end,
        product_id=a.product,
    )
    if _json_output(a, out, u):
        return EXIT_OK
    fields = [
        ("account_id", u.account_id),
        ("period", _enum_name(metering_pb2.UsagePeriod, "USAGE_PERIOD_", u.period)),
    ]
    if a.product:
        fields.append(("product_id", a.product))
    fields.extend(_totals_fields(u.totals))
    print(format_fields(fields), file=out)
    print("", file=out)
    print(_usage_tables(u), file=out)
    return EXIT_OK


def _report_lines(lines: Iterable[metering_pb2.PeriodReportLine]) -> str:
    return format_table(
        ["PRODUCT_ID", "ENDPOINT", "REQUESTS", "SUCCESSFUL", "FAILED", "CREDITS", "QUANTITY"],
        [
            [
                x.product_id,
                x.endpoint or "-",
                str(x.total_requests),
                str(x.successful_requests),
                str(x.failed_requests),
                x.credits_consumed,
                str(x.quantity),
            ]
            for x in lines
        ],
        right={2, 3, 4, 5, 6},
    )


def _cmd_period_report(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    period, year, month, day = a.period
    r = c.get_period_report(a.account_id, year, month, day, period=period, version=a.version)
    if _json_output(a, out, r):
        return EXIT_OK
    fields = [
        ("account_id", r.account_id),
        ("period", _enum_name(metering_pb2.UsagePeriod, "USAGE_PERIOD_", r.period)),
        ("time_zone", r.time_zone),
        ("version", f"{r.version} of {r.latest_version}"),
        ("create_time", iso(r.create_time)),
    ]
    fields.extend(_totals_fields(r.totals))
    print(format_fields(fields), file=out)
    print("\nLines:\n" + _report_lines(r.lines), file=out)
    if r.version > 1:
        print(f"\nChanges from version {r.version - 1}:\n" + _report_lines(r.changes), file=out)
    return EXIT_OK


def _cmd_usage_events(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    events = c.iter_usage_events(
        a.account_id,
        start_time=a.start,
        end_time=a.end,
        product_id=a.product,
        page_size=min(a.limit, 100) if a.limit else 0,
        preset=a.preset,
    )
    if a.limit:
        events = islice(events, a.limit)
    listed = list(events)
    if _json_output(a, out, metering_pb2.ListUsageEventsResponse(events=listed)):
        return EXIT_OK
    rows = [
        [e.event_id, iso(e.start_time), e.product_id, _event_status(e), e.message, e.credits]
        for e in listed
    ]
    headers = ["Transaction Id", "Timestamp(UTC)", "Product Id", "Status", "Message", "Charge"]
    print(format_table(headers, rows, right={5}), file=out)
    return EXIT_OK


def _cmd_usage_record(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    event_id = a.event_id or str(uuid.uuid4())
    r = c.record_usage(
        a.account_id,
        event_id,
        a.product_id,
        endpoint=a.endpoint,
        status="failed" if a.failed else None,
        status_code=a.status_code,
        message=a.message,
        quantity=a.quantity,
        credits=a.credits,
    )
    if _json_output(a, out, r):
        return EXIT_OK
    e = r.event
    fields = [
        ("event_id", e.event_id),
        ("account_id", e.account_id),
        ("product_id", e.product_id),
        ("status", _event_status(e)),
        ("quantity", str(e.quantity)),
        ("credits", e.credits),
        ("duplicate", "yes" if r.duplicate else "no"),
    ]
    if r.HasField("entry"):
        fields.extend(
            [("entry_id", str(r.entry.entry_id)), ("balance_after", r.entry.balance_after)]
        )
    print(format_fields(fields), file=out)
    return EXIT_OK


def _cmd_export(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    show = sys.stderr.isatty() if a.progress is None else a.progress
    meter = _Progress(sys.stderr) if show else None
    try:
        file_name, content_type, written = c.export_usage_report_to(
            a.out,
            a.account_id,
            format=a.format,
            preset=a.preset,
            start_time=a.start,
            end_time=a.end,
            product_id=a.product,
            progress=meter.update if meter else None,
        )
    finally:
        if meter:
            meter.done()
    if a.output == "json":
        # Not a protobuf message: the file written, with the JSON names of the first chunk.
        report = {
            "path": str(a.out),
            "fileName": file_name,
            "contentType": content_type,
            "bytes": written,
        }
        print(json.dumps(report, indent=2), file=out)
        return EXIT_OK
    fields = [
        ("path", str(a.out)),
        ("file_name", file_name),
        ("content_type", content_type),
        ("bytes", str(written)),
    ]
    print(format_fields(fields), file=out)
    return EXIT_OK


def _cmd_summary(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    s: accounts_pb2.GetAccountSummaryResponse = c.get_account_summary(a.account_id)
    if _json_output(a, out, s):
        return EXIT_OK
    sub = s.subscription
    month = s.usage_this_month.totals
    fields = [
        ("account_id", s.account.account_id),
        ("display_name", s.account.display_name),
        ("email", s.account.email),
        ("time_zone", s.account.time_zone),
        ("account_create_time", iso(s.account_create_time)),
        ("last_activity_time", iso(s.last_activity_time)),
        ("currency", s.credit_balance.currency),
        ("balance", s.credit_balance.balance),
        ("reserved", s.credit_balance.reserved),
        ("available", s.credit_balance.available),
        ("overdraft_limit", s.credit_balance.overdraft_limit),
        (
            "subscription",
            _enum_name(accounts_pb2.SubscriptionStatus, "SUBSCRIPTION_STATUS_", sub.status),
        ),
    ]
    if sub.plan:
        fields.extend(
            [
                ("plan", sub.plan),
                ("credits_per_period", sub.credits_per_period),
                ("current_period_start", iso(sub.current_period_start_time)),
                ("current_period_end", iso(sub.current_period_end_time)),
            ]
        )
    fields.extend(
        [
            ("requests_this_month", str(month.total_requests)),
            ("credits_this_month", month.credits_consumed),
            ("total_requests_all_time", str(s.total_requests_all_time)),
        ]
    )
    print(format_fields(fields), file=out)
    return EXIT_OK


# --- parser -----------------------------------------------------------------------


def _preset(value: str) -> str:
    """argparse type: a range preset name such as ``"Last 7 days"`` (kept as given)."""
    try:
        rq.range_preset(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not (args.tls_ca or args.tls_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca),
        private_key=_read(args.tls_key),
        certificate_chain=_read(args.tls_cert),
    )


EPILOG = """\
output:
  -o json prints the server's answer as protobuf JSON (MessageToJson: lowerCamelCase
  names, int64 as strings), a list command one List*Response holding every row it
  fetched; export prints the file it wrote as a JSON object.

usage events:
  tallyctl usage record ACCOUNT PRODUCT [--quantity N] [--event-id ID] records one
  event and charges it (tallyctl usage record --help); an account named "record"
  is queried as tallyctl usage [OPTIONS] -- record.

exit status:
  0  success
  1  the server answered with an error (stderr: error: <CODE> <reason>: <message>),
     or the connection, a file or a value failed
  2  usage error (bad command line)
  3  verify found the account inconsistent
"""


def _version() -> str:
    try:
        return metadata.version("tally-metering-client")
    except metadata.PackageNotFoundError:
        return "unknown"


#: Global options that take a value (to find the command in argv).
_VALUE_OPTIONS = frozenset(
    {"--target", "--timeout", "--token", "--tls-ca", "--tls-cert", "--tls-key", "-o", "--output"}
)


def _subcommand_argv(argv: list[str]) -> list[str]:
    """``usage record ...`` becomes the parser's ``usage-record ...``: ``usage ACCOUNT``
    stays the statistics command."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        i += 2 if argv[i] in _VALUE_OPTIONS else 1
    if argv[i : i + 2] == ["usage", "record"]:
        return [*argv[:i], "usage-record", *argv[i + 2 :]]
    return argv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tallyctl",
        description="Operate a Tally server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"tallyctl {_version()}")
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="tables and fields (default), or the answer as protobuf JSON",
    )
    p.add_argument(
        "--target",
        default=os.environ.get("TALLY_TARGET") or DEFAULT_TARGET,
        help="server host:port (default: $TALLY_TARGET or %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="deadline of each attempt in seconds (default: %(default)s)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("TALLY_TOKEN", ""),
        help="bearer token (default: $TALLY_TOKEN)",
    )
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("TALLY_TLS_CA", ""),
        help="CA certificate file: connect with TLS (default: $TALLY_TLS_CA)",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get("TALLY_TLS_CERT", ""),
        help="client certificate file for mutual TLS",
    )
    p.add_argument(
        "--tls-key",
        default=os.environ.get("TALLY_TLS_KEY", ""),
        help="client private key file for mutual TLS",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def request_id(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--request-id", help="idempotency key (default: a new UUID)")

    acc = sub.add_parser("accounts", help="create, show and list accounts")
    acc_sub = acc.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    create = acc_sub.add_parser("create", help="create an account")
    create.add_argument("account_id", metavar="ID")
    create.add_argument("--email", default="")
    create.add_argument(
        "--display-name",
        "--name",
        dest="display_name",
        default="",
        help="display name (--name is the earlier spelling)",
    )
    create.add_argument("--time-zone", default="", help="IANA zone (server default: UTC)")
    create.add_argument("--currency", default="", help="credit unit (server default: CREDIT)")
    create.add_argument("--overdraft-limit", help="credits below zero allowed (default: 0)")
    create.add_argument(
        "--trial-end", type=_parse_time, help="ISO-8601 time, e.g. 2025-01-31T00:00Z"
    )
    request_id(create)
    create.set_defaults(func=_cmd_accounts_create)
    get = acc_sub.add_parser("get", help="show an account")
    get.add_argument("account_id", metavar="ID")
    get.set_defaults(func=_cmd_accounts_get)
    lst = acc_sub.add_parser("list", help="list accounts")
    lst.add_argument("--limit", type=_non_negative, default=0, help="at most N (default: all)")
    lst.set_defaults(func=_cmd_accounts_list)

    for name, help_text in (("topup", "add credit"), ("debit", "spend credit")):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("account_id", metavar="ID")
        sp.add_argument("amount", metavar="AMOUNT", help='decimal credits, e.g. "2.95"')
        sp.add_argument("--description", default="")
        sp.add_argument("--reference", default="")
        if name == "topup":
            sp.add_argument(
                "--grant-type",
                type=_grant_type,
                metavar="TYPE",
                help="purchased (default), subscription, promotional or auto_reload",
            )
            sp.add_argument(
                "--expires", type=_parse_time, help="ISO-8601 time when the credit expires"
            )
            sp.add_argument(
                "--priority",
                type=_non_negative,
                help="draw order, 0-1000, lower first (default: by grant type)",
            )
        request_id(sp)
        sp.set_defaults(func=_cmd_movement(name))

    adj = sub.add_parser("adjust", help="write a signed correction")
    adj.add_argument("account_id", metavar="ID")
    adj.add_argument("amount", metavar="AMOUNT", help='signed decimal credits, e.g. "-1.5"')
    adj.add_argument("--reason", required=True, help="why (becomes the description)")
    adj.add_argument("--reference", default="")
    request_id(adj)
    adj.set_defaults(func=_cmd_movement("adjust"))

    bal = sub.add_parser("balance", help="show an account's credit")
    bal.add_argument("account_id", metavar="ID")
    bal.add_argument(
        "--as-of", type=_parse_time, help="ISO-8601 past instant to answer for (default: now)"
    )
    bal.set_defaults(func=_cmd_balance)

    grs = sub.add_parser("grants", help="an account's credit grants in draw order")
    grs.add_argument("account_id", metavar="ACCOUNT")
    grs.add_argument("--all", action="store_true", help="also spent and expired grants")
    grs.set_defaults(func=_cmd_grants)

    ar = sub.add_parser("auto-reload", help="set an account's auto-reload rule")
    ar.add_argument("account_id", metavar="ACCOUNT")
    ar.add_argument("--threshold", help="reload when available credit falls below this")
    ar.add_argument("--amount", help="credit one reload adds")
    ar.add_argument(
        "--max-per-day", type=_non_negative, default=0, help="reloads per day, 0 for no limit"
    )
    ar.add_argument("--max-per-month", default="0", help="credit per month, 0 for no limit")
    ar.add_argument("--disable", action="store_true", help="turn auto-reload off")
    request_id(ar)
    ar.set_defaults(func=_cmd_auto_reload)

    rls = sub.add_parser("reloads", help="an account's reload intents, newest first")
    rls.add_argument("account_id", metavar="ACCOUNT")
    rls.add_argument(
        "--limit", type=_non_negative, default=50, help="at most N, 0 for all (default: 50)"
    )
    rls.set_defaults(func=_cmd_reloads)

    sbs = sub.add_parser("subscribe", help="set or change an account's subscription")
    sbs.add_argument("account_id", metavar="ACCOUNT")
    sbs.add_argument("plan", metavar="PLAN")
    sbs.add_argument("credits", metavar="CREDITS", help="credits granted each period")
    sbs.add_argument("--period", choices=["monthly", "yearly"], default="monthly")
    sbs.add_argument(
        "--anchor", type=_parse_time, help="ISO-8601 start of the first period (default: now)"
    )
    sbs.add_argument(
        "--rollover", action="store_true", help="unspent credit of a period never expires"
    )
    request_id(sbs)
    sbs.set_defaults(func=_cmd_subscribe)

    uns = sub.add_parser("unsubscribe", help="cancel an account's subscription")
    uns.add_argument("account_id", metavar="ACCOUNT")
    request_id(uns)
    uns.set_defaults(func=_cmd_unsubscribe)

    led = sub.add_parser("ledger", help="list an account's ledger entries, newest first")
    led.add_argument("account_id", metavar="ID")
    led.add_argument("--type", choices=["credit", "debit", "adjustment"])
    led.add_argument("--start", type=_parse_time, help="entries at or after this ISO-8601 time")
    led.add_argument("--end", type=_parse_time, help="entries before this ISO-8601 time")
    led.add_argument(
        "--limit", type=_non_negative, default=50, help="at most N, 0 for all (default: 50)"
    )
    led.set_defaults(func=_cmd_ledger)

    ver = sub.add_parser("verify", help="check an account's balance against its ledger")
    ver.add_argument("account_id", metavar="ID")
    ver.set_defaults(func=_cmd_verify)

    prod = sub.add_parser("products", help="create, update and list products of the catalog")
    prod_sub = prod.add_subparsers(dest="products_command", required=True, metavar="ACTION")
    up = prod_sub.add_parser("upsert", help="create or replace a product")
    up.add_argument("product_id", metavar="ID")
    up.add_argument("credits_per_unit", metavar="CREDITS_PER_UNIT", help='e.g. "0.5"')
    up.add_argument("--display-name", default="")
    up.add_argument(
        "--charge-failed", action="store_true", help="charge failed calls like completed ones"
    )
    up.add_argument("--minimum-charge", help="smallest charge of a charged event")
    request_id(up)
    up.set_defaults(func=_cmd_products_upsert)
    plst = prod_sub.add_parser("list", help="list the catalog")
    plst.add_argument("--limit", type=_non_negative, default=0, help="at most N (default: all)")
    plst.set_defaults(func=_cmd_products_list)

    def time_range(sp: argparse.ArgumentParser, *, preset: bool) -> None:
        if preset:
            sp.add_argument(
                "--preset",
                type=_preset,
                help='today, yesterday, "Last 7 days", last_30_days, this_month, "Last Month"',
            )
        sp.add_argument("--start", type=_parse_time, help="at or after this ISO-8601 time")
        sp.add_argument("--end", type=_parse_time, help="before this ISO-8601 time")
        sp.add_argument("--product", default="", help="only this product")

    use = sub.add_parser(
        "usage",
        help="usage statistics of an account; usage record: record a usage event",
        description="Usage statistics of an account. To record an event: "
        "tallyctl usage record ACCOUNT PRODUCT (see tallyctl usage record --help).",
    )
    use.add_argument("account_id", metavar="ACCOUNT")
    use.add_argument("--period", choices=["daily", "monthly", "yearly"], help="bucket size")
    time_range(use, preset=True)
    use.set_defaults(func=_cmd_usage)

    # `tallyctl usage record ...` (main() rewrites it to this hidden command).
    rec = sub.add_parser(
        "usage-record",
        prog="tallyctl usage record",
        description="Record one finished usage event and charge it from the catalog price. "
        "The event id is the idempotency key: recording it again charges nothing more.",
    )
    rec.add_argument("account_id", metavar="ACCOUNT")
    rec.add_argument("product_id", metavar="PRODUCT")
    rec.add_argument("--quantity", type=_non_negative, help="units used (server default: 1)")
    rec.add_argument("--event-id", help="the caller's transaction id (default: a new UUID)")
    rec.add_argument("--endpoint", default="", help='the API endpoint, e.g. "/pan/verify"')
    rec.add_argument("--failed", action="store_true", help="the call failed (status FAILED)")
    rec.add_argument("--status-code", type=int, default=0, help="the caller's status code")
    rec.add_argument("--message", default="", help="the caller's status message")
    rec.add_argument("--credits", help="charge exactly this (default: from the catalog)")
    rec.set_defaults(func=_cmd_usage_record)

    evs = sub.add_parser("usage-events", help="an account's usage events, newest first")
    evs.add_argument("account_id", metavar="ACCOUNT")
    time_range(evs, preset=True)
    evs.add_argument(
        "--limit", type=_non_negative, default=50, help="at most N, 0 for all (default: 50)"
    )
    evs.set_defaults(func=_cmd_usage_events)

    exp = sub.add_parser("export", help="write a CSV or XLSX usage report to a file")
    exp.add_argument("account_id", metavar="ACCOUNT")
    exp.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    exp.add_argument(
        "--format", choices=["csv", "xlsx"], help="default: from FILE's suffix, else xlsx"
    )
    time_range(exp, preset=True)
    exp.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="rows and bytes so far on stderr (default: when stderr is a terminal)",
    )
    exp.set_defaults(func=_cmd_export)

    summ = sub.add_parser("summary", help="an account's overview")
    summ.add_argument("account_id", metavar="ACCOUNT")
    summ.set_defaults(func=_cmd_summary)

    rep = sub.add_parser(
        "period-report",
        help="the versioned usage report of a closed day or month",
        description="The usage report of a closed month (YYYY-MM) or day (YYYY-MM-DD) of "
        "the account's time zone, per product and endpoint. The first request freezes "
        "version 1; events that arrive late for the period make new versions.",
    )
    rep.add_argument("account_id", metavar="ACCOUNT")
    rep.add_argument("period", metavar="PERIOD", type=_period, help="YYYY-MM or YYYY-MM-DD")
    rep.add_argument(
        "--version", type=_non_negative, default=0, help="this version (default: the latest)"
    )
    rep.set_defaults(func=_cmd_period_report)
    return p


def format_error(e: TallyError) -> str:
    """``error: <CODE> <reason>: <message>`` and one line per field violation."""
    head = f"{e.code_name} {e.reason}" if e.reason else e.code_name
    lines = [f"error: {head}: {e.message}"]
    lines.extend(f"  {field}: {description}" for field, description in e.field_violations)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_subcommand_argv(sys.argv[1:] if argv is None else argv))
    if getattr(args, "preset", None) and (args.start is not None or args.end is not None):
        parser.error("give either --preset or --start/--end, not both")
    if (
        args.command == "auto-reload"
        and not args.disable
        and (args.threshold is None or args.amount is None)
    ):
        parser.error("auto-reload needs --threshold and --amount (or --disable)")
    func: Command = args.func
    try:
        with TallyClient(
            args.target,
            timeout_seconds=args.timeout,
            channel_credentials=_credentials(args),
            metadata=[("authorization", f"Bearer {args.token}")] if args.token else None,
        ) as client:
            return func(client, args, sys.stdout)
    except TallyError as e:
        print(format_error(e), file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
