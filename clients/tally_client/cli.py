"""``tallyctl``: operator command line for a Tally server.

Exit status: 0 on success, 1 when the server answers with an error (printed to
stderr as ``error: <CODE> <reason>: <message>`` plus field violations), 2 for a
usage error, 3 when ``verify`` finds the account inconsistent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime
from itertools import islice
from typing import TextIO

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from tally.v1 import account_pb2, credits_pb2, ledger_pb2

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
        ("name", a.name),
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


def _balance_fields(b: credits_pb2.CreditBalance) -> list[tuple[str, str]]:
    fields = [
        ("account_id", b.account_id),
        ("currency", b.currency),
        ("balance", b.balance),
        ("reserved", b.reserved),
        ("available", b.available),
        ("overdraft_limit", b.overdraft_limit),
        ("update_time", iso(b.update_time)),
    ]
    r = b.auto_reload
    if r.enabled:
        fields.append(("auto_reload", f"on: add {r.amount} below {r.threshold}"))
    else:
        fields.append(("auto_reload", "off"))
    return fields


# --- commands -------------------------------------------------------------------

Command = Callable[[TallyClient, argparse.Namespace, TextIO], int]


def _parse_time(value: str) -> datetime:
    """argparse type: an ISO-8601 instant with a UTC offset (or ``Z``)."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r}") from None
    if dt.tzinfo is None:
        raise argparse.ArgumentTypeError(f"time needs a UTC offset or Z: {value!r}")
    return dt


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
        name=a.name,
        time_zone=a.time_zone,
        currency=a.currency,
        overdraft_limit=a.overdraft_limit,
        trial_end_time=a.trial_end,
        request_id=a.request_id,
    )
    print(format_fields(_account_fields(account)), file=out)
    return EXIT_OK


def _cmd_accounts_get(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    print(format_fields(_account_fields(c.get_account(a.account_id))), file=out)
    return EXIT_OK


def _cmd_accounts_list(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    accounts = c.iter_accounts(page_size=min(a.limit, 100) if a.limit else 0)
    if a.limit:
        accounts = islice(accounts, a.limit)
    rows = [
        [
            x.account_id,
            x.name,
            x.email,
            x.currency,
            x.overdraft_limit,
            x.time_zone,
            iso(x.create_time),
        ]
        for x in accounts
    ]
    headers = ["ACCOUNT_ID", "NAME", "EMAIL", "CURRENCY", "OVERDRAFT", "TIME_ZONE", "CREATED"]
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
        print(format_fields(_entry_fields(entry)), file=out)
        return EXIT_OK

    return run


def _cmd_balance(c: TallyClient, a: argparse.Namespace, out: TextIO) -> int:
    print(format_fields(_balance_fields(c.get_balance(a.account_id))), file=out)
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
        for e in entries
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


# --- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tallyctl", description="Operate a Tally server.")
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
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def request_id(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--request-id", help="idempotency key (default: a new UUID)")

    acc = sub.add_parser("accounts", help="create, show and list accounts")
    acc_sub = acc.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    create = acc_sub.add_parser("create", help="create an account")
    create.add_argument("account_id", metavar="ID")
    create.add_argument("--email", default="")
    create.add_argument("--name", default="")
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
    bal.set_defaults(func=_cmd_balance)

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
    return p


def format_error(e: TallyError) -> str:
    """``error: <CODE> <reason>: <message>`` and one line per field violation."""
    head = f"{e.code_name} {e.reason}" if e.reason else e.code_name
    lines = [f"error: {head}: {e.message}"]
    lines.extend(f"  {field}: {description}" for field, description in e.field_violations)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        with TallyClient(args.target, timeout_seconds=args.timeout) as client:
            return func(client, args, sys.stdout)
    except TallyError as e:
        print(format_error(e), file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
