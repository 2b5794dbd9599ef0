"""Typed SQLAlchemy models of the tables created by the migrations.

The migrations are the source of the schema (they also create the server-side money
functions); these models are how Python code reads the tables.
"""

import uuid
from datetime import datetime
from functools import cache
from typing import Any, TypeVar, cast

from sqlalchemy import BigInteger, Computed, Identity, Integer, LargeBinary, Text, inspect
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {
        datetime: TIMESTAMP(timezone=True),
        dict[str, Any]: JSONB,
        int: BigInteger,
        str: Text,
    }


class Account(Base):
    __tablename__ = "accounts"

    account_id: Mapped[str] = mapped_column(primary_key=True)
    email: Mapped[str]
    name: Mapped[str]
    time_zone: Mapped[str]
    currency: Mapped[str]
    overdraft_limit: Mapped[int]
    trial_ends_at: Mapped[datetime | None]
    balance: Mapped[int]
    reserved: Mapped[int]
    last_sequence: Mapped[int]
    auto_reload_enabled: Mapped[bool]
    auto_reload_threshold: Mapped[int]
    auto_reload_amount: Mapped[int]
    usage_requests: Mapped[int]
    last_activity_at: Mapped[datetime | None]
    auto_reload_max_per_day: Mapped[int] = mapped_column(Integer)
    auto_reload_max_per_month: Mapped[int]
    auto_reload_disabled_reason: Mapped[str]
    subscription_renews_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    balance_updated_at: Mapped[datetime]


class Hold(Base):
    __tablename__ = "holds"

    reservation_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    account_id: Mapped[str]
    status: Mapped[str]
    amount: Mapped[int]
    captured: Mapped[int]
    expires_at: Mapped[datetime]
    reference: Mapped[str]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata")
    request_id: Mapped[str]
    created_at: Mapped[datetime]
    finalized_at: Mapped[datetime | None]


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"

    entry_id: Mapped[int] = mapped_column(Identity(always=True), primary_key=True)
    account_id: Mapped[str]
    sequence: Mapped[int]
    entry_type: Mapped[str]
    amount: Mapped[int]
    balance_after: Mapped[int]
    description: Mapped[str]
    reference: Mapped[str]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata")
    request_id: Mapped[str]
    reservation_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime]
    credit_type: Mapped[str | None]


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    request_id: Mapped[str] = mapped_column(primary_key=True)
    method: Mapped[str]
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary)
    response: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class Product(Base):
    __tablename__ = "products"

    product_id: Mapped[str] = mapped_column(primary_key=True)
    display_name: Mapped[str]
    credits_per_unit: Mapped[int]
    charge_failed: Mapped[bool]
    minimum_charge: Mapped[int]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class UsageEvent(Base):
    __tablename__ = "usage_events"

    account_id: Mapped[str] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(primary_key=True)
    product_id: Mapped[str]
    endpoint: Mapped[str]
    status: Mapped[str]
    success: Mapped[bool]
    status_code: Mapped[int] = mapped_column(Integer)
    message: Mapped[str]
    quantity: Mapped[int]
    credits: Mapped[int]
    credit_type: Mapped[str]
    started_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    processing_time_ms: Mapped[int]
    request_metadata: Mapped[dict[str, Any]]
    result_metadata: Mapped[dict[str, Any]]
    webhook_url: Mapped[str]
    created_at: Mapped[datetime]
    entry_id: Mapped[int | None]
    reservation_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary)
    finish_fingerprint: Mapped[bytes | None] = mapped_column(LargeBinary)


class UsageRollup(Base):
    __tablename__ = "usage_rollups"

    account_id: Mapped[str] = mapped_column(primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)
    product_id: Mapped[str] = mapped_column(primary_key=True)
    endpoint: Mapped[str] = mapped_column(primary_key=True)
    requests: Mapped[int]
    successful: Mapped[int]
    failed: Mapped[int]
    credits: Mapped[int]
    quantity: Mapped[int]


class Grant(Base):
    __tablename__ = "grants"

    grant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    account_id: Mapped[str]
    grant_type: Mapped[str]
    amount: Mapped[int]
    remaining: Mapped[int]
    priority: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    entry_id: Mapped[int]
    expired: Mapped[bool]
    # remaining = 0, generated (migration 0014): the indexes' predicate, so a draw is HOT
    spent: Mapped[bool] = mapped_column(Computed("remaining = 0", persisted=True))
    subscription_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    subscription_period: Mapped[int | None]


class Subscription(Base):
    __tablename__ = "subscriptions"

    account_id: Mapped[str] = mapped_column(primary_key=True)
    subscription_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    plan: Mapped[str]
    credits_per_period: Mapped[int]
    period: Mapped[str]
    anchor_at: Mapped[datetime]
    rollover: Mapped[bool]
    periods_granted: Mapped[int]
    period_started_at: Mapped[datetime | None]
    renews_at: Mapped[datetime]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class ReloadIntent(Base):
    __tablename__ = "reload_intents"

    intent_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    account_id: Mapped[str]
    status: Mapped[str]
    amount: Mapped[int]
    attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str]
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    entry_id: Mapped[int | None]
    charge_id: Mapped[str]


class Threshold(Base):
    __tablename__ = "thresholds"

    threshold_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    account_id: Mapped[str]
    metric: Mapped[str]
    value: Mapped[int]
    percent: Mapped[int] = mapped_column(Integer)
    fire_at: Mapped[int]
    period: Mapped[str | None]
    request_id: Mapped[str]
    created_at: Mapped[datetime]
    deleted_at: Mapped[datetime | None]
    period_start: Mapped[datetime | None]
    period_value: Mapped[int]


class Notification(Base):
    __tablename__ = "notifications"

    notification_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    account_id: Mapped[str]
    threshold_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    metric: Mapped[str]
    observed: Mapped[int]
    fire_at: Mapped[int]
    period_start: Mapped[datetime | None]
    crossed_at: Mapped[datetime]
    status: Mapped[str]
    attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str]
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]


M = TypeVar("M", bound=Base)


class _Row:
    """A plain row read from JSON: the model's attributes without SQLAlchemy's
    instrumentation (building an ORM object only to turn it into protobuf cost more
    than the rest of the conversion)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


_TIMESTAMP, _UUID, _PLAIN = 1, 2, 0


@cache
def _columns(model: type[Base]) -> tuple[tuple[str, str, int], ...]:
    """(attribute, column, kind) of each mapped column, read once per model."""
    found = []
    for attr in inspect(model).column_attrs:
        column = attr.columns[0]
        kind = _PLAIN
        if isinstance(column.type, TIMESTAMP):
            kind = _TIMESTAMP
        elif isinstance(column.type, UUID):
            kind = _UUID
        found.append((attr.key, column.name, kind))
    return tuple(found)


def from_json(model: type[M], row: dict[str, Any]) -> M:
    """The row a money function answered (PostgreSQL's to_jsonb), with the model's
    attributes and types, for the converters in `convert.py`. Not attached to a
    session, and not an ORM instance: only read it."""
    values: dict[str, Any] = {}
    for key, name, kind in _columns(model):
        value = row.get(name)
        if value is not None and kind:
            value = datetime.fromisoformat(value) if kind == _TIMESTAMP else uuid.UUID(value)
        values[key] = value
    return cast(M, _Row(values))
