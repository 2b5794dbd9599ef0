"""A database outage, logged once when it starts and once when it ends.

While PostgreSQL is down every sweep, reload attempt, listener reconnect and health probe
fails, several times a second; logging each (with its traceback) buried the log (a 20 s
outage wrote 1,579 lines). The health watcher and the background workers report here
instead: the first failure logs one warning, later ones are only counted, and the first
health probe that reaches the database again logs one line with the outage's length.
Errors that are not an outage (``db.is_unavailable`` is false) are not absorbed: their
callers log them with their traceback as before.
"""

import logging
import time

from tally_service.db import describe, is_unavailable

log = logging.getLogger(__name__)


class Outage:
    """The database's reachability as this process last saw it (for logging only:
    correctness never depends on it)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def absorb(self, exc: BaseException, where: str) -> bool:
        """Records `exc` if it says the database is unavailable (logging the start of an
        outage once) and returns True; returns False for any other error."""
        if not is_unavailable(exc):
            return False
        self.failed(f"{where}: {describe(exc)}")
        return True

    def failed(self, reason: str) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            log.warning(
                "database unavailable (%s); calls fail with UNAVAILABLE until it answers", reason
            )

    def recovered(self) -> None:
        if self.since is None:
            return
        log.warning(
            "database available again after %.1f s (%d failed attempts in the background)",
            time.monotonic() - self.since,
            self.failures,
        )
        self.since = None
        self.failures = 0


# One per process: every part of the server reports the same database.
outage = Outage()
