"""Writes down holds that have expired.

Correctness never waits for this: every read and every money movement already treats a
hold past its expiry as expired. The sweeper only makes the rows say so, a few accounts
at a time, each in its own short transaction under that account's lock, so any number
of replicas may run it at once.
"""

import asyncio
import logging

from sqlalchemy import text

from tally_service.db import Database

log = logging.getLogger(__name__)

_DUE_ACCOUNTS = text(
    "SELECT DISTINCT account_id FROM ("
    "  SELECT account_id FROM holds WHERE status = 'pending' AND expires_at <= clock_timestamp()"
    "  ORDER BY expires_at LIMIT :limit) due"
)


async def sweep_once(db: Database, batch: int = 100) -> int:
    """Expires the overdue holds of up to `batch` holds' accounts; returns accounts swept."""
    async with db.engine.connect() as conn:
        accounts = list((await conn.execute(_DUE_ACCOUNTS, {"limit": batch})).scalars())
    for account_id in accounts:
        async with db.engine.begin() as conn:
            await conn.execute(text("SELECT tally_expire_holds(:a)"), {"a": account_id})
    return len(accounts)


async def run(db: Database, interval_seconds: float) -> None:
    while True:
        try:
            while await sweep_once(db) > 0:
                pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("hold sweep failed; will retry")
        await asyncio.sleep(interval_seconds)
