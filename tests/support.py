"""Shared assertions and helpers for tests."""

import contextlib
import os
import socket
import threading

from tally_client import TallyClient

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
