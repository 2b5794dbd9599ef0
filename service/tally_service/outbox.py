"""The shape shared by Tally's outbox workers (reload intents, threshold notifications).

A decision is written in SQL as a row, in the transaction that made it, with a
`pg_notify` on the worker's channel. A worker wakes on that notification (LISTEN, with
polling as a fallback), claims one due row at a time for a lease (`FOR UPDATE SKIP
LOCKED`, so any number of processes share the work), calls a hook outside any
transaction with the row's id as the idempotency key, and records the outcome; a
failure is retried with exponential backoff. A crash between claim and outcome lets
the lease lapse and the row is claimed again with the same id. Subclasses supply
`run_once` (claim, call, record) and the channel.
"""

import asyncio
import contextlib
import logging

from tally_service.db import Database, async_url
from tally_service.outage import outage

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0
POLL_SECONDS = 2.0


def backoff_seconds(first_delay: float, attempts: int) -> float:
    """The delay after the `attempts`-th failure: doubling from `first_delay`, capped."""
    delay: float = first_delay * 2 ** max(attempts - 1, 0)
    return min(delay, MAX_BACKOFF_SECONDS)


class OutboxWorker:
    """Runs `run_once` until nothing is due, then waits for a wake-up or the poll."""

    channel = ""  # the pg_notify channel of the rows' decisions
    name = "outbox worker"

    def __init__(self, db: Database) -> None:
        self.db = db
        self._wake = asyncio.Event()

    async def run_once(self) -> bool:
        """Carries out one due row; False when none was due."""
        raise NotImplementedError

    def after_pass(self) -> None:
        """Called after a pass that ended without an error."""

    async def _listen(self) -> None:
        """Wakes the worker on every committed decision (LISTEN on the channel)."""
        import asyncpg

        url = async_url(self.db.engine.url.render_as_string(hide_password=False))
        while True:
            try:
                conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql", 1))
                try:
                    closed = asyncio.Event()
                    conn.add_termination_listener(lambda *_, done=closed: done.set())
                    await conn.add_listener(self.channel, lambda *_: self._wake.set())
                    await closed.wait()
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not outage.absorb(exc, f"{self.name} listener"):
                    log.warning("%s listener: %s; reconnecting", self.name, exc)
                await asyncio.sleep(POLL_SECONDS)

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen())
        try:
            while True:
                try:
                    while await self.run_once():
                        pass
                    self.after_pass()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not outage.absorb(exc, self.name):
                        log.exception("%s failed; will retry", self.name)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
