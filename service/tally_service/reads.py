"""Every read query of the service (reads.py is their one home): each opens its own
session or connection (one per RPC) and answers model objects or plain values."""

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from sqlalchemy import and_, func, literal, or_, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from tally_service import errors, models, ranges
from tally_service.db import Database, translate_state
from tally_service.ranges import Range, ceil_bucket, floor_bucket


async def _account(session: AsyncSession, account_id: str) -> models.Account:
    row = await session.get(models.Account, account_id)
    if row is None:
        raise errors.NotFound("account", account_id)
    return row


async def get_account(db: Database, account_id: str) -> models.Account:
    async with db.sessions() as session:
        return await _account(session, account_id)


async def list_accounts(db: Database, after: str | None, limit: int) -> list[models.Account]:
    query = select(models.Account).order_by(models.Account.account_id).limit(limit)
    if after is not None:
        query = query.where(models.Account.account_id > after)
    async with db.sessions() as session:
        return list((await session.scalars(query)).all())


@dataclass
class Balance:
    account: models.Account
    reserved: int
    update_time: datetime
    subscription_credits: int
    purchased_credits: int


# Whatever fell due (hold or grant expiries, a subscription renewal) is written down
# under the account lock before a read, so reads are exact at this instant. A no-op
# when nothing is due.
_CATCH_UP = text(
    "SELECT tally_expire_holds(a.account_id) FROM accounts a WHERE a.account_id = :account_id "
    "AND (a.subscription_renews_at <= clock_timestamp() "
    "  OR EXISTS (SELECT 1 FROM holds h WHERE h.account_id = a.account_id "
    "             AND h.status = 'pending' AND h.expires_at <= clock_timestamp()) "
    "  OR EXISTS (SELECT 1 FROM grants g WHERE g.account_id = a.account_id "
    "             AND NOT g.spent AND NOT g.expired AND g.expires_at <= clock_timestamp()))"
)


async def catch_up(db: Database, account_id: str) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(_CATCH_UP, {"account_id": account_id})


async def get_balance(db: Database, account_id: str) -> Balance:
    response, _ = await db.call("tally_balance", {"account_id": account_id})
    account = models.from_json(models.Account, response["account"])
    return Balance(
        account,
        account.reserved,
        account.balance_updated_at,
        int(response["subscription_credits"]),
        int(response["purchased_credits"]),
    )


@dataclass
class BalanceAt:
    """The balance and reserved credit at a past instant, read from the ledger and holds."""

    account: models.Account
    balance: int
    reserved: int
    update_time: datetime | None


# One statement, so one snapshot. The balance is the last entry's balance_after at or
# before the instant (ledger_entries_by_time: one index probe). Holds that count are
# those placed at or before it, not yet finalized then and not past expiry then; as no
# hold lives longer than MAX_TTL_SECONDS, only holds placed in that window before the
# instant can count (holds_by_account_time, migration 0007). update_time is the latest
# change at or before the instant among the last entry and the holds of that window.
_BALANCE_AT = text(
    """
SELECT last.balance_after, last.created_at AS entry_time, held.reserved, held.changed
FROM accounts a
LEFT JOIN LATERAL (
    SELECT e.balance_after, e.created_at FROM ledger_entries e
    WHERE e.account_id = a.account_id AND e.created_at <= :as_of
    ORDER BY e.created_at DESC, e.sequence DESC LIMIT 1
) last ON true
CROSS JOIN LATERAL (
    SELECT coalesce(sum(h.amount) FILTER (
               WHERE h.expires_at > :as_of
                 AND (h.finalized_at IS NULL OR h.finalized_at > :as_of)), 0) AS reserved,
           max(greatest(h.created_at,
                        CASE WHEN least(coalesce(h.finalized_at, 'infinity'), h.expires_at)
                                  <= :as_of
                             THEN least(coalesce(h.finalized_at, 'infinity'), h.expires_at)
                        END)) AS changed
    FROM holds h
    WHERE h.account_id = a.account_id AND h.created_at <= :as_of
      AND h.created_at > :as_of - CAST(:max_ttl AS integer) * interval '1 second'
) held
WHERE a.account_id = :account_id
"""
)


async def get_balance_at(
    db: Database, account_id: str, as_of: datetime, max_ttl_seconds: int
) -> BalanceAt:
    """Balance, reserved and the last change as of `as_of` (zeros before the account's
    first entry or hold). What fell due before now is written down first, so an expiry
    (dated at its instant) counts even if nothing had touched the account since."""
    await catch_up(db, account_id)
    async with db.sessions() as session:
        account = await _account(session, account_id)
        row = (
            await session.execute(
                _BALANCE_AT,
                {"account_id": account_id, "as_of": as_of, "max_ttl": max_ttl_seconds},
            )
        ).one()
    times = [t for t in (row.entry_time, row.changed) if t is not None]
    return BalanceAt(
        account, int(row.balance_after or 0), int(row.reserved), max(times) if times else None
    )


# Draw order (sql/40_grants.sql): priority, then the earliest expiry (none last), then
# the oldest; the grant id breaks ties so that the order, and so a keyset, is total.
NO_EXPIRY = datetime.max.replace(tzinfo=UTC)


async def list_grants(
    db: Database,
    account_id: str,
    include_spent: bool,
    after: tuple[int, datetime | None, datetime, str] | None,
    limit: int,
) -> list[models.Grant]:
    """One page of the account's grants in draw order, after the keyset `after`
    (priority, expiry or None, created_at, grant id)."""
    await catch_up(db, account_id)
    g = models.Grant
    expiry = func.coalesce(g.expires_at, literal(NO_EXPIRY))
    key = tuple_(g.priority, expiry, g.created_at, g.grant_id)
    query = select(g).where(g.account_id == account_id).order_by(*key.clauses).limit(limit)
    if not include_spent:
        query = query.where(~g.spent)
    if after is not None:
        priority, expires_at, created_at, grant_id = after
        bound = (priority, expires_at or NO_EXPIRY, created_at, uuid.UUID(grant_id))
        query = query.where(key > tuple_(*bound))
    async with db.sessions() as session:
        await _account(session, account_id)
        return list((await session.scalars(query)).all())


async def _newest_first(
    db: Database,
    account_id: str,
    model: Any,
    at: Any,
    key: Any,
    before: tuple[datetime, str] | None,
    limit: int,
    *conditions: Any,
) -> list[Any]:
    """One page of an account's rows, newest first (`at`, then `key`, a UUID, descending),
    after the keyset `before` (AIP-158 tokens decode to it); NOT_FOUND for an unknown
    account."""
    query = (
        select(model)
        .where(model.account_id == account_id, *conditions)
        .order_by(at.desc(), key.desc())
        .limit(limit)
    )
    if before is not None:
        query = query.where(or_(at < before[0], and_(at == before[0], key < uuid.UUID(before[1]))))
    async with db.sessions() as session:
        await _account(session, account_id)
        return list((await session.scalars(query)).all())


async def list_reloads(
    db: Database, account_id: str, before: tuple[datetime, str] | None, limit: int
) -> list[models.ReloadIntent]:
    r = models.ReloadIntent
    return await _newest_first(db, account_id, r, r.created_at, r.intent_id, before, limit)


async def get_grant(db: Database, grant_id: str) -> models.Grant:
    """The grant, after its account is caught up (so an expiry that fell due shows)."""
    async with db.sessions() as session:
        row = await session.get(models.Grant, uuid.UUID(grant_id))
    if row is None:
        raise errors.NotFound("grant", grant_id)
    await catch_up(db, row.account_id)
    async with db.sessions() as session:
        fresh = await session.get(models.Grant, uuid.UUID(grant_id))
    return fresh or row


async def get_reload(db: Database, intent_id: str) -> models.ReloadIntent:
    async with db.sessions() as session:
        row = await session.get(models.ReloadIntent, uuid.UUID(intent_id))
    if row is None:
        raise errors.NotFound("reload", intent_id)
    return row


async def list_reservations(
    db: Database,
    account_id: str,
    status: str | None,
    before: tuple[datetime, str] | None,
    limit: int,
) -> list[models.Hold]:
    """The account's holds, newest first. Expiries that fell due are written down first,
    so a status filter sees a pending hold past its expiry as expired."""
    await catch_up(db, account_id)
    h = models.Hold
    conditions = [] if status is None else [h.status == status]
    return await _newest_first(
        db, account_id, h, h.created_at, h.reservation_id, before, limit, *conditions
    )


async def get_product(db: Database, product_id: str) -> models.Product:
    async with db.sessions() as session:
        row = await session.get(models.Product, product_id)
    if row is None:
        raise errors.NotFound("product", product_id)
    return row


async def get_usage_event(
    db: Database, account_id: str, event_id: str
) -> tuple[models.UsageEvent, datetime | None]:
    """The event with its hold's expiry (for a started job whose hold expired unswept)."""
    e = models.UsageEvent
    query = (
        select(e, models.Hold.expires_at)
        .outerjoin(models.Hold, models.Hold.reservation_id == e.reservation_id)
        .where(e.account_id == account_id, e.event_id == event_id)
    )
    async with db.sessions() as session:
        await _account(session, account_id)
        row = (await session.execute(query)).one_or_none()
    if row is None:
        raise errors.NotFound("event", event_id)
    return row[0], row[1]


async def get_threshold(db: Database, threshold_id: str) -> models.Threshold:
    async with db.sessions() as session:
        row = await session.get(models.Threshold, uuid.UUID(threshold_id))
    if row is None:
        raise errors.NotFound("threshold", threshold_id)
    return row


async def get_notification(db: Database, notification_id: str) -> models.Notification:
    async with db.sessions() as session:
        row = await session.get(models.Notification, uuid.UUID(notification_id))
    if row is None:
        raise errors.NotFound("notification", notification_id)
    return row


async def list_thresholds(
    db: Database, account_id: str, before: tuple[datetime, str] | None, limit: int
) -> list[models.Threshold]:
    m = models.Threshold
    return await _newest_first(
        db, account_id, m, m.created_at, m.threshold_id, before, limit, m.deleted_at.is_(None)
    )


async def list_notifications(
    db: Database, account_id: str, before: tuple[datetime, str] | None, limit: int
) -> list[models.Notification]:
    n = models.Notification
    return await _newest_first(db, account_id, n, n.crossed_at, n.notification_id, before, limit)


async def get_subscription(db: Database, account_id: str) -> models.Subscription | None:
    async with db.sessions() as session:
        return await session.get(models.Subscription, account_id)


async def get_reservation(db: Database, reservation_id: str) -> models.Hold:
    async with db.sessions() as session:
        hold = await session.get(models.Hold, uuid.UUID(reservation_id))
        now = (await session.execute(select(func.clock_timestamp()))).scalar_one()
    if hold is None:
        raise errors.NotFound("reservation", reservation_id)
    if hold.status == "pending" and hold.expires_at <= now:
        # Expired at that instant; the sweeper will write it down.
        hold.status, hold.finalized_at = "expired", hold.expires_at
    return hold


async def list_entries(
    db: Database,
    account_id: str,
    *,
    entry_type: str | None,
    start: datetime | None,
    end: datetime | None,
    before_sequence: int | None,
    limit: int,
) -> list[models.LedgerEntry]:
    e = models.LedgerEntry
    conditions: list[Any] = [e.account_id == account_id]
    if entry_type is not None:
        conditions.append(e.entry_type == entry_type)
    if start is not None:
        conditions.append(e.created_at >= start)
    if end is not None:
        conditions.append(e.created_at < end)
    if before_sequence is not None:
        conditions.append(e.sequence < before_sequence)
    query = select(e).where(and_(*conditions)).order_by(e.sequence.desc()).limit(limit)
    async with db.sessions() as session:
        await _account(session, account_id)
        return list((await session.scalars(query)).all())


async def get_entry(db: Database, entry_id: int) -> models.LedgerEntry:
    async with db.sessions() as session:
        row = await session.get(models.LedgerEntry, entry_id)
    if row is None:
        raise errors.NotFound("entry", str(entry_id))
    return row


@dataclass
class Verification:
    stored_balance: int
    ledger_balance: int
    stored_reserved: int
    holds_reserved: int
    entry_count: int
    violations: list[str]


_LEDGER_FACTS = text(
    """
    SELECT coalesce(sum(amount), 0) AS total,
           count(*) AS entries,
           coalesce(max(sequence), 0) AS last_sequence,
           count(*) FILTER (WHERE broken) AS broken_links
    FROM (
        SELECT amount, sequence,
               balance_after <> coalesce(lag(balance_after) OVER w, 0) + amount
               OR sequence <> coalesce(lag(sequence) OVER w, 0) + 1 AS broken
        FROM ledger_entries WHERE account_id = :account_id
        WINDOW w AS (ORDER BY sequence)
    ) chain
    """
)
_LAST_BALANCE = text(
    "SELECT balance_after FROM ledger_entries WHERE account_id = :account_id "
    "ORDER BY sequence DESC LIMIT 1"
)
_GRANT_FACTS = text("SELECT coalesce(sum(remaining), 0) FROM grants WHERE account_id = :account_id")
_HOLD_FACTS = text(
    """
    SELECT coalesce(sum(amount - captured), 0) AS pending_all,
           coalesce(sum(amount - captured) FILTER (WHERE expires_at > clock_timestamp()), 0)
               AS pending_live,
           count(*) FILTER (WHERE expires_at <= :caught_up) AS overdue
    FROM holds WHERE account_id = :account_id AND status = 'pending'
    """
)
# Verification first catches the account up under its lock (as any movement would), at
# `caught_up`. Then no grant due by then may be left unsettled, and an expired grant may
# keep remaining credit only where the pending holds stand on it: inside the first
# `reserved` credits of the grants in draw order (DESIGN.md 5, 5b). A grant that fell due
# after `caught_up` is due, not yet written off, and not a violation.
_CATCH_UP_ALWAYS = text(
    "SELECT tally_expire_holds(account_id) FROM accounts WHERE account_id = :account_id"
)
_EXPIRY_FACTS = text(
    """
    WITH ordered AS (
        SELECT expired, expires_at, remaining,
               coalesce(sum(remaining) OVER (
                   ORDER BY priority, expires_at NULLS LAST, created_at, grant_id
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS ahead
        FROM grants WHERE account_id = :account_id AND NOT spent
    )
    SELECT count(*) FILTER (WHERE NOT o.expired AND o.expires_at <= :caught_up) AS overdue,
           coalesce(sum(o.remaining) FILTER (
               WHERE NOT o.expired AND o.expires_at <= :caught_up), 0) AS overdue_credit,
           coalesce(sum(o.remaining - least(o.remaining, greatest(a.reserved - o.ahead, 0)))
                    FILTER (WHERE o.expired), 0) AS uncovered
    FROM ordered o CROSS JOIN accounts a WHERE a.account_id = :account_id
    """
)


async def verify_account(db: Database, account_id: str) -> Verification:
    """Catches the account up, then recomputes balance, reserved and grants from the
    rows, in one snapshot."""
    async with db.engine.begin() as conn:
        caught_up = (await conn.execute(text("SELECT clock_timestamp()"))).scalar_one()
        await conn.execute(_CATCH_UP_ALWAYS, {"account_id": account_id})
    params = {"account_id": account_id, "caught_up": caught_up}
    async with db.sessions() as session, session.begin():
        await session.connection(
            execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
        )
        account = await _account(session, account_id)
        ledger = (await session.execute(_LEDGER_FACTS, params)).one()
        last_balance = (await session.execute(_LAST_BALANCE, params)).scalar_one_or_none()
        holds = (await session.execute(_HOLD_FACTS, params)).one()
        granted = int((await session.execute(_GRANT_FACTS, params)).scalar_one())
        expiry = (await session.execute(_EXPIRY_FACTS, params)).one()
    violations = []
    if account.balance != ledger.total:
        violations.append(
            f"stored balance {account.balance} differs from the ledger sum {ledger.total}"
        )
    if (last_balance or 0) != account.balance:
        violations.append(
            f"the last entry's balance_after {last_balance} differs from the stored balance"
        )
    if ledger.broken_links:
        violations.append(f"{ledger.broken_links} entries break the balance_after chain")
    if ledger.last_sequence != account.last_sequence:
        violations.append(
            f"last sequence {ledger.last_sequence} differs from stored {account.last_sequence}"
        )
    if account.reserved != holds.pending_all:
        violations.append(
            f"stored reserved {account.reserved} differs from pending holds {holds.pending_all}"
        )
    if granted != max(account.balance, 0):
        violations.append(
            f"unspent grants {granted} differ from the positive balance {max(account.balance, 0)}"
        )
    if expiry.overdue:
        violations.append(
            f"{expiry.overdue} grants past their expiry still hold {expiry.overdue_credit} "
            "spendable credit after the catch-up"
        )
    if expiry.uncovered:
        violations.append(
            f"expired grants keep {expiry.uncovered} credit that no pending hold stands on"
        )
    if holds.overdue:
        violations.append(f"{holds.overdue} holds past their expiry are still pending")
    renews_at = account.subscription_renews_at
    if renews_at is not None and renews_at <= caught_up:
        violations.append(f"the subscription renewal due at {renews_at} was not granted")
    return Verification(
        stored_balance=account.balance,
        ledger_balance=int(ledger.total),
        stored_reserved=account.reserved - (int(holds.pending_all) - int(holds.pending_live)),
        holds_reserved=int(holds.pending_live),
        entry_count=int(ledger.entries),
        violations=violations,
    )


async def list_products(db: Database, after: str | None, limit: int) -> list[models.Product]:
    """Products by id, after the id `after`."""
    query = select(models.Product).order_by(models.Product.product_id).limit(limit)
    if after is not None:
        query = query.where(models.Product.product_id > after)
    async with db.sessions() as session:
        return list((await session.scalars(query)).all())


async def list_usage_events(
    db: Database,
    account_id: str,
    start: datetime | None,
    end: datetime | None,
    product_id: str,
    before: tuple[datetime, str] | None,
    limit: int,
) -> list[tuple[models.UsageEvent, datetime | None]]:
    """Events newest first, each with its hold's expiry (for not-yet-swept expiries)."""
    e = models.UsageEvent
    conditions: list[Any] = [e.account_id == account_id]
    if start is not None:
        conditions.append(e.started_at >= start)
    if end is not None:
        conditions.append(e.started_at < end)
    if product_id:
        conditions.append(e.product_id == product_id)
    if before is not None:
        # `started_at <= before` is implied by the keyset condition after it, but only it
        # is an index condition: without it a page's index scan starts at the top of the
        # range and filters out every newer row (a deep page read the whole range above it).
        conditions.append(e.started_at <= before[0])
        conditions.append(
            or_(e.started_at < before[0], and_(e.started_at == before[0], e.event_id < before[1]))
        )
    query = (
        select(e, models.Hold.expires_at)
        .outerjoin(models.Hold, models.Hold.reservation_id == e.reservation_id)
        .where(and_(*conditions))
        .order_by(e.started_at.desc(), e.event_id.desc())
        .limit(limit)
    )
    async with db.sessions() as session:
        return [(row[0], row[1]) for row in (await session.execute(query)).all()]


_DUE_ACCOUNTS = text(
    "SELECT DISTINCT account_id FROM ("
    "  (SELECT account_id FROM holds"
    "   WHERE status = 'pending' AND expires_at <= clock_timestamp()"
    "   ORDER BY expires_at LIMIT :limit)"
    "  UNION ALL"
    "  (SELECT account_id FROM grants"
    "   WHERE NOT spent AND NOT expired AND expires_at <= clock_timestamp()"
    "   ORDER BY expires_at LIMIT :limit)"
    "  UNION ALL"
    "  (SELECT account_id FROM accounts WHERE subscription_renews_at <= clock_timestamp()"
    "   LIMIT :limit)) due"
)


async def due_accounts(db: Database, limit: int) -> list[str]:
    """Accounts with a hold or grant past its expiry or a subscription period to renew
    (up to `limit` of each kind), for the sweeper."""
    async with db.engine.connect() as conn:
        return list((await conn.execute(_DUE_ACCOUNTS, {"limit": limit})).scalars())


FETCH_ROWS = 2000
# started_at comes as the text Python's datetime.isoformat() gives for a UTC instant
# ("2026-11-30T09:15:02.123456+00:00", without the fraction when it is zero), formatted
# by PostgreSQL: the server process's one core is the limit, and this is its largest
# per-row cost otherwise.
_EXPORT_ROWS = """
SELECT event_id,
       to_char(started_at AT TIME ZONE 'UTC',
               CASE WHEN date_trunc('second', started_at) = started_at
                    THEN 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'
                    ELSE 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"' END),
       product_id, endpoint, status, status_code, message, quantity, credits,
       processing_time_ms
FROM usage_events
WHERE account_id = $1 AND started_at >= $2 AND started_at < $3
  AND status IN ('completed', 'failed'){product}
ORDER BY started_at, event_id
"""


async def usage_event_rows(
    db: Database, account_id: str, r: Range, product_id: str
) -> AsyncIterator[list[Any]]:
    """The completed and failed events of the range, oldest first, as export rows, in
    batches of FETCH_ROWS from a server-side cursor (reports.py formats them)."""
    args: list[Any] = [account_id, r.start, r.end]
    product = ""
    if product_id:
        args.append(product_id)
        product = " AND product_id = $4"
    query = _EXPORT_ROWS.format(product=product)
    try:
        async with db.engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            async with driver.transaction(isolation="repeatable_read", readonly=True):
                # The rows in the index's order, never a sort of the whole range
                # before the first row (whose FETCH the statement timeout bounds).
                await driver.execute("SET LOCAL enable_sort = off")
                cursor = await driver.cursor(query, *args)
                rows = await cursor.fetch(FETCH_ROWS)
                while rows:
                    # The next FETCH is sent before this batch is formatted, so
                    # PostgreSQL produces it while this process formats.
                    following = asyncio.ensure_future(cursor.fetch(FETCH_ROWS))
                    await asyncio.sleep(0)
                    try:
                        yield rows
                    finally:
                        if not following.done():
                            with contextlib.suppress(Exception):
                                await asyncio.shield(following)
                    rows = following.result()
    except asyncpg.PostgresError as exc:
        raise _export_error(exc) from None
    except (OSError, asyncpg.InterfaceError):
        raise errors.DatabaseUnavailable("the database is unavailable; retry") from None


def _export_error(exc: asyncpg.PostgresError) -> Exception:
    error = translate_state(exc.sqlstate or "", getattr(exc, "detail", None), exc)
    if isinstance(error, errors.DomainError):
        return error
    return errors.DatabaseUnavailable("contention; retry")


# -- period reports (period_reports.py freezes them) ---------------------------------

_FIND_PERIOD_REPORT = text(
    "SELECT report_id FROM period_reports "
    "WHERE account_id = :account_id AND period = :period AND local_start = :local_start"
)
_PERIOD_REPORT_HEAD = text(
    "SELECT h.account_id, h.period, h.time_zone, h.period_start, h.period_end, h.version, "
    "       v.version, v.created_at "
    "FROM period_reports h "
    "LEFT JOIN period_report_versions v "
    "  ON v.report_id = h.report_id AND v.version = coalesce(:version, h.version) "
    "WHERE h.report_id = :report_id"
)
_PERIOD_REPORT_SUMS = """
SELECT product_id, endpoint, sum(requests)::bigint, sum(successful)::bigint,
       sum(failed)::bigint, sum(credits)::bigint, sum(quantity)::bigint
FROM period_report_changes
WHERE report_id = :report_id AND {versions}
GROUP BY product_id, endpoint
HAVING sum(requests) <> 0 OR sum(successful) <> 0 OR sum(failed) <> 0
    OR sum(credits) <> 0 OR sum(quantity) <> 0
ORDER BY product_id, endpoint
"""
_PERIOD_REPORT_LINES = text(_PERIOD_REPORT_SUMS.format(versions="version <= :version"))
_PERIOD_REPORT_CHANGES = text(
    _PERIOD_REPORT_SUMS.format(versions="version = :version AND version > 1")
)


@dataclass
class Totals:
    """Usage counts: of a range, a period, or a product and endpoint."""

    requests: int = 0
    successful: int = 0
    failed: int = 0
    credits: int = 0
    quantity: int = 0

    def add(self, other: "Totals") -> None:
        self.requests += other.requests
        self.successful += other.successful
        self.failed += other.failed
        self.credits += other.credits
        self.quantity += other.quantity


@dataclass
class ReportLine:
    """Usage of one product and endpoint in a period report (or, in `changes`, its
    difference from the previous version)."""

    product_id: str
    endpoint: str
    totals: Totals


@dataclass
class PeriodReportVersion:
    account_id: str
    unit: str  # "day" or "month"
    time_zone: str
    start: datetime
    end: datetime
    version: int
    latest_version: int
    created_at: datetime
    lines: list[ReportLine]
    changes: list[ReportLine]

    def total(self) -> Totals:
        out = Totals()
        for line in self.lines:
            out.add(line.totals)
        return out


async def find_period_report(
    db: Database, account_id: str, unit: str, local_start: date
) -> int | None:
    """The id of the account's report of the period, if it was ever frozen."""
    params = {"account_id": account_id, "period": unit, "local_start": local_start}
    async with db.engine.connect() as conn:
        found: int | None = (await conn.execute(_FIND_PERIOD_REPORT, params)).scalar()
    return found


async def period_report_version(
    db: Database, report_id: int, version: int
) -> PeriodReportVersion | None:
    """The report at `version` (0: the latest), None past the latest. A version, once
    visible, never changes (only the transaction that made it adds to it), so its parts
    need no common snapshot."""
    async with db.engine.connect() as conn:
        head = (
            await conn.execute(
                _PERIOD_REPORT_HEAD, {"report_id": report_id, "version": version or None}
            )
        ).one()
        account_id, unit, time_zone, start, end, latest, found, created_at = head
        if found is None:
            return None
        where = {"report_id": report_id, "version": found}
        lines = [
            ReportLine(row[0], row[1], Totals(*row[2:]))
            for row in await conn.execute(_PERIOD_REPORT_LINES, where)
        ]
        changes = [
            ReportLine(row[0], row[1], Totals(*row[2:]))
            for row in await conn.execute(_PERIOD_REPORT_CHANGES, where)
        ]
    return PeriodReportVersion(
        account_id, unit, time_zone, start, end, found, latest, created_at, lines, changes
    )


# -- usage statistics ------------------------------------------------------------------
# Exact totals over any range, from whole-day and 15-minute rollups plus raw edge events.
# The whole local days inside the range (in the account's time zone) come from
# `usage_days`; the partial days at its edges from `usage_rollups` (their whole 15-minute
# buckets) and `usage_events` itself (the partial buckets at the very edges), so a range
# that starts or ends at any instant is still exact. A year is then about 365 rows per
# product and endpoint, two days of quarter-hours and a few raw events, whatever the
# number of events. Periods (day, month, year: none shorter than a day) are truncated in
# the account's time zone.

# Whole days are read from usage_days only from here on: since then every zone's offset
# is a multiple of 15 minutes, so local days are whole 15-minute buckets (the last
# exceptions: Africa/Monrovia at -0:44:30 until 1972, Pacific/Kiritimati at -10:40 until
# October 1979). A range reaching back before it reads its days before it quarter-hour
# by quarter-hour, as every range did before usage_days.
DAYS_SINCE = datetime(1980, 1, 1, tzinfo=UTC)
# The periods made of whole local days (date_trunc units); a shorter one (an hour) would
# read everything from the 15-minute rollups.
DAY_UNITS = frozenset({"day", "week", "month", "quarter", "year"})

# The parts of a range, each summed where it is cheapest, all in local time: whole days
# [first_day, last_day) from usage_days; the edges [start_n, end_n) (n = 1, 2: before
# and after the whole days) from their whole buckets [inner_start_n, inner_end_n) in
# usage_rollups and from raw events in the rest. Every condition is one index range.
# Summed twice: per period, and per product and endpoint (the totals), so that the
# server adds up a few hundred rows, not one per period, product and endpoint.
_STATS = """
WITH parts AS (
    SELECT day::timestamp AS t, product_id, endpoint, requests, successful, failed, credits,
           quantity
    FROM usage_days
    WHERE account_id = :account_id AND day >= :first_day AND day < :last_day
      {product_filter}
    UNION ALL
    SELECT bucket_start AT TIME ZONE :zone, product_id, endpoint, requests, successful, failed,
           credits, quantity
    FROM usage_rollups
    WHERE account_id = :account_id AND bucket_start >= :inner_start_1
      AND bucket_start < :inner_end_1 {product_filter}
    UNION ALL
    SELECT bucket_start AT TIME ZONE :zone, product_id, endpoint, requests, successful, failed,
           credits, quantity
    FROM usage_rollups
    WHERE account_id = :account_id AND bucket_start >= :inner_start_2
      AND bucket_start < :inner_end_2 {product_filter}
    UNION ALL
    SELECT started_at AT TIME ZONE :zone, product_id, endpoint, 1, success::int,
           (NOT success)::int, credits, quantity
    FROM usage_events
    WHERE account_id = :account_id AND status IN ('completed', 'failed')
      AND ((started_at >= :start_1 AND started_at < :inner_start_1)
           OR (started_at >= :inner_end_1 AND started_at < :end_1)
           OR (started_at >= :start_2 AND started_at < :inner_start_2)
           OR (started_at >= :inner_end_2 AND started_at < :end_2)) {product_filter}
)
SELECT grouping(period) = 1, period, product_id, endpoint, sum(requests)::bigint,
       sum(successful)::bigint, sum(failed)::bigint, sum(credits)::bigint,
       sum(quantity)::bigint
FROM (SELECT date_trunc(:unit, t) AS period, * FROM parts) p
GROUP BY GROUPING SETS ((period), (product_id, endpoint))
"""


def whole_days(r: Range, zone: ZoneInfo) -> tuple[date, date] | None:
    """The local days [first, last) that lie wholly inside r (none before DAYS_SINCE)."""
    start = max(r.start, DAYS_SINCE)
    if start >= r.end:
        return None
    first = start.astimezone(zone).date()
    if ranges.midnight(first, zone) < start:
        first += timedelta(days=1)
    last = r.end.astimezone(zone).date()  # the day r.end falls in starts at or before it
    return (first, last) if first < last else None


def _edge(n: int, start: datetime, end: datetime) -> dict[str, datetime]:
    """The parameters of edge n, [start, end): its whole buckets and the rest."""
    inner_start, inner_end = ceil_bucket(start), floor_bucket(end)
    if inner_start >= inner_end:
        inner_start = inner_end = end
    return {
        f"start_{n}": start,
        f"end_{n}": end,
        f"inner_start_{n}": inner_start,
        f"inner_end_{n}": inner_end,
    }


def usage_stats_query(
    account_id: str, r: Range, unit: str, zone: ZoneInfo, product_id: str
) -> tuple[str, dict[str, Any]]:
    """The usage statistics query of a range, and its parameters."""
    params: dict[str, Any] = {"account_id": account_id, "unit": unit, "zone": zone.key}
    days = whole_days(r, zone) if unit in DAY_UNITS else None
    if days is None:
        # No whole day: one edge, the whole range.
        params.update(first_day=date(2000, 1, 1), last_day=date(2000, 1, 1))
        params.update(_edge(1, r.start, r.end) | _edge(2, r.end, r.end))
    else:
        first, last = days
        params.update(first_day=first, last_day=last)
        params.update(
            _edge(1, r.start, ranges.midnight(first, zone))
            | _edge(2, ranges.midnight(last, zone), r.end)
        )
    product_filter = ""
    if product_id:
        product_filter = "AND product_id = :product_id"
        params["product_id"] = product_id
    return _STATS.format(product_filter=product_filter), params


_EXPIRE_OVERDUE = text(
    "SELECT tally_expire_holds(account_id) FROM holds WHERE account_id = :account_id "
    "AND status = 'pending' AND expires_at <= clock_timestamp() LIMIT 1"
)


@dataclass
class Stats:
    total: Totals = field(default_factory=Totals)
    by_period: dict[datetime, Totals] = field(default_factory=lambda: defaultdict(Totals))
    by_endpoint: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    by_product: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    by_product_endpoint: dict[tuple[str, str], Totals] = field(
        default_factory=lambda: defaultdict(Totals)
    )


async def usage_stats(
    db: Database, account_id: str, r: Range, unit: str, zone: ZoneInfo, product_id: str
) -> Stats:
    """Usage of the account over the range: in total, per period (`unit` truncated in
    `zone`), per product, endpoint and both; only `product_id` when it is given."""
    sql, params = usage_stats_query(account_id, r, unit, zone, product_id)
    result = Stats()
    async with db.engine.connect() as conn:
        # Write down holds past their expiry first, so their events count as failed now
        # rather than when the sweeper next runs (a no-op without overdue holds).
        await conn.execute(_EXPIRE_OVERDUE, {"account_id": account_id})
        await conn.commit()
        rows = await conn.execute(text(sql), params)
        for per_product, period, product, endpoint, *numbers in rows:
            totals = Totals(*numbers)
            if not per_product:
                result.by_period[period] = totals
                continue
            result.total.add(totals)
            result.by_endpoint[endpoint].add(totals)
            result.by_product[product].add(totals)
            result.by_product_endpoint[(product, endpoint)] = totals
    return result
