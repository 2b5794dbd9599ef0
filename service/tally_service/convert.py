"""Rows to protobuf messages. The money functions answer with rows as JSON; reads answer
with model objects; both go through `from_json` into models and then one converter per
message, so a first response and its replay are built by the same code."""

import uuid
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from sqlalchemy import inspect
from sqlalchemy.dialects.postgresql import TIMESTAMP, UUID

from tally.v1 import accounts_pb2, credits_pb2, ledger_pb2
from tally_service import models
from tally_service.money import format_amount

M = TypeVar("M", bound=models.Base)

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


def from_json(model: type[M], row: dict[str, Any]) -> M:
    """Builds a detached model object from a row serialised by PostgreSQL's to_jsonb."""
    values: dict[str, Any] = {}
    for attr in inspect(model).column_attrs:
        column = attr.columns[0]
        value = row.get(column.name)
        if value is not None and isinstance(column.type, TIMESTAMP):
            value = datetime.fromisoformat(value)
        elif value is not None and isinstance(column.type, UUID):
            value = uuid.UUID(value)
        values[attr.key] = value
    return model(**values)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    json_format.ParseDict(value, message)
    return message


def account(row: models.Account) -> accounts_pb2.Account:
    return accounts_pb2.Account(
        account_id=row.account_id,
        email=row.email,
        name=row.name,
        time_zone=row.time_zone,
        currency=row.currency,
        overdraft_limit=format_amount(row.overdraft_limit),
        trial_end_time=timestamp(row.trial_ends_at),
        create_time=timestamp(row.created_at),
        update_time=timestamp(row.updated_at),
    )


def reservation(row: models.Hold) -> credits_pb2.Reservation:
    return credits_pb2.Reservation(
        reservation_id=str(row.reservation_id),
        account_id=row.account_id,
        status=RESERVATION_STATUSES[row.status],
        amount=format_amount(row.amount),
        captured_amount=format_amount(row.captured),
        expire_time=timestamp(row.expires_at),
        reference=row.reference,
        metadata=struct(row.metadata_),
        create_time=timestamp(row.created_at),
        finalize_time=timestamp(row.finalized_at),
        request_id=row.request_id,
    )


def entry(row: models.LedgerEntry) -> ledger_pb2.LedgerEntry:
    return ledger_pb2.LedgerEntry(
        entry_id=row.entry_id,
        account_id=row.account_id,
        sequence=row.sequence,
        type=ENTRY_TYPES[row.entry_type],
        amount=format_amount(row.amount),
        balance_after=format_amount(row.balance_after),
        description=row.description,
        reference=row.reference,
        metadata=struct(row.metadata_),
        create_time=timestamp(row.created_at),
        request_id=row.request_id,
        reservation_id=str(row.reservation_id) if row.reservation_id else "",
    )
