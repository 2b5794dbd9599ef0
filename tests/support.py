"""Shared assertions and helpers for tests."""

import asyncio
import contextlib
import os
import socket
import threading
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tally_client import TallyClient
from tally_service.db import async_url

# How many times more examples a Hypothesis test draws under the "long" profile.
LONG_FACTOR = 25


def scaled(examples: int) -> int:
    """A test's example count: as given in CI, LONG_FACTOR times more in a long run."""
    if os.environ.get("TALLY_HYPOTHESIS_PROFILE") == "long":
        return examples * LONG_FACTOR
    return examples


def assert_consistent(client: TallyClient, account_id: str) -> None:
    """The DESIGN.md invariants 1-4 hold for the account (recomputed by the server)."""
    report = client.verify_account(account_id)
    assert report.consistent, list(report.violations)
    assert report.stored_balance == report.ledger_balance
    assert report.stored_reserved == report.holds_reserved


def query(database_url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """One SQL statement in its own committed transaction; its rows (none for a
    statement that returns none)."""

    async def run() -> list[tuple[Any, ...]]:
        engine = create_async_engine(async_url(database_url))
        async with engine.begin() as conn:
            result = await conn.execute(text(sql), params)
            rows = [tuple(r) for r in result] if result.returns_rows else []
        await engine.dispose()
        return rows

    return asyncio.run(run())


class DroppingProxy:
    """A loopback TCP proxy to `target` that closes the first `drops` connections."""

    def __init__(self, target: str, drops: int) -> None:
        host, port = target.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.drops = drops
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drops:
                conn.close()
                continue
            upstream = socket.create_connection(self.upstream)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing.set()
        self.listener.close()


# Reconnect quickly, so a retry after a dropped connection is not refused by the
# channel's own reconnect backoff (1 s by default).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20)]
