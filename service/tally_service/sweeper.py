"""Writes down holds and grants that have expired, and renews subscriptions; gives a
new database's tables their first statistics.

Correctness never waits for this: every money movement catches up on what fell due
under the account lock, and reads catch up first too. The sweeper only makes the rows
say so, a few accounts at a time, each in its own short transaction under that
account's lock, so any number of replicas may run it at once.
"""

import asyncio
import logging

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from tally_service import errors, reads
from tally_service.db import Database, unknown_zone
from tally_service.metrics import Metrics
from tally_service.outage import outage

log = logging.getLogger(__name__)

# Under the account's lock (taken first, and again by tally_expire_holds), the pending holds
# before minus after are exactly the holds this sweep expired (for tally_holds_total).
_LOCK = text("SELECT 1 FROM accounts WHERE account_id = :a FOR UPDATE")
_PENDING = text("SELECT count(*) FROM holds WHERE account_id = :a AND status = 'pending'")


async def sweep_once(db: Database, batch: int = 100, metrics: Metrics | None = None) -> int:
    """Expires the overdue holds of up to `batch` holds' accounts; returns accounts swept.
    An account that cannot be swept for a reason of its own (a time zone stored before
    unknown ones were refused) is logged and passed over: it never stops the others."""
    accounts = await reads.due_accounts(db, batch)
    expired = swept = 0
    for account_id in accounts:
        try:
            async with db.engine.begin() as conn:
                await conn.execute(_LOCK, {"a": account_id})
                before = (await conn.execute(_PENDING, {"a": account_id})).scalar_one()
                await conn.execute(text("SELECT tally_expire_holds(:a)"), {"a": account_id})
                after = (await conn.execute(_PENDING, {"a": account_id})).scalar_one()
        except DBAPIError as exc:
            zone = unknown_zone(getattr(exc.orig, "sqlstate", None) or "", exc)
            if zone is None:
                raise
            error = errors.AccountTimeZoneUnknown(account_id, zone)
            log.warning("account %r was not swept: %s", account_id, error.message)
            continue
        expired += int(before) - int(after)
        swept += 1
    if metrics is not None:
        metrics.hold("expired", expired)
    return swept


# The tables of Tally's schema that were never analysed (reltuples -1) and have grown
# past the ten pages that the planner assumes of such a table. Their file size is read
# directly, so the answer does not wait for the statistics collector.
_UNANALYSED = text(
    """
    SELECT c.oid::regclass::text FROM pg_class c
    WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
      AND c.reltuples < 0
      AND pg_relation_size(c.oid) >= :pages * current_setting('block_size')::bigint
    ORDER BY 1
    """
)


async def analyze_new_tables(
    db: Database, min_pages: int = 10, tried: set[str] | None = None
) -> list[str]:
    """ANALYZEs the tables that have no statistics yet but at least `min_pages` pages;
    returns their names. Autovacuum does the same within about a minute. Until then,
    every session's plans made on such a table stay as they were made: on a new or
    restored database the first calls plan on empty tables, and some of those plans
    read more the more the table grows (docs/benchmarks.md, "Plans made on empty
    tables"). An ANALYZE makes every session plan again. A table smaller than the
    planner's ten-page assumption is left to autovacuum: analysed almost empty, it would
    be planned as empty until its next ANALYZE. SKIP_LOCKED: a replica already
    analysing a table is left to it. A name in `tried` is not analysed again (a table
    the database user may not analyse stays without statistics; its name is not logged
    at every sweep)."""
    async with db.engine.begin() as conn:
        names = list((await conn.execute(_UNANALYSED, {"pages": min_pages})).scalars())
        if tried is not None:
            names = [n for n in names if n not in tried]
            tried.update(names)
        for name in names:
            await conn.execute(text(f"ANALYZE (SKIP_LOCKED) {name}"))
    if names:
        log.info("first statistics of %s", ", ".join(names))
    return names


async def run(db: Database, interval_seconds: float, metrics: Metrics | None = None) -> None:
    analysed: set[str] = set()
    while True:
        try:
            await analyze_new_tables(db, tried=analysed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not outage.absorb(exc, "first statistics"):
                log.exception("ANALYZE of new tables failed; will retry")
        try:
            while await sweep_once(db, metrics=metrics) > 0:
                pass
            if metrics is not None:
                metrics.sweeper_last_success.set_to_current_time()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not outage.absorb(exc, "hold sweep"):
                log.exception("hold sweep failed; will retry")
        await asyncio.sleep(interval_seconds)
