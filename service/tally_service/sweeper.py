"""Writes down holds and grants that have expired, and renews subscriptions.

Correctness never waits for this: every money movement catches up on what fell due
under the account lock, and reads catch up first too. The sweeper only makes the rows
say so, a few accounts at a time, each in its own short transaction under that
account's lock, so any number of replicas may run it at once.
"""

import asyncio
import logging

from sqlalchemy import text

from tally_service import reads
from tally_service.db import Database
from tally_service.metrics import Metrics
from tally_service.outage import outage

log = logging.getLogger(__name__)

# Under the account's lock (taken first, and again by tally_expire_holds), the pending holds
# before minus after are exactly the holds this sweep expired (for tally_holds_total).
_LOCK = text("SELECT 1 FROM accounts WHERE account_id = :a FOR UPDATE")
_PENDING = text("SELECT count(*) FROM holds WHERE account_id = :a AND status = 'pending'")


async def sweep_once(db: Database, batch: int = 100, metrics: Metrics | None = None) -> int:
    """Expires the overdue holds of up to `batch` holds' accounts; returns accounts swept."""
    accounts = await reads.due_accounts(db, batch)
    expired = 0
    for account_id in accounts:
        async with db.engine.begin() as conn:
            await conn.execute(_LOCK, {"a": account_id})
            before = (await conn.execute(_PENDING, {"a": account_id})).scalar_one()
            await conn.execute(text("SELECT tally_expire_holds(:a)"), {"a": account_id})
            after = (await conn.execute(_PENDING, {"a": account_id})).scalar_one()
        expired += int(before) - int(after)
    if metrics is not None:
        metrics.hold("expired", expired)
    return len(accounts)


async def run(db: Database, interval_seconds: float, metrics: Metrics | None = None) -> None:
    while True:
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
