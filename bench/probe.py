"""What the machine and PostgreSQL did during one measured window.

A thread of the benchmark process takes a snapshot at the start and at the end of the
window (CPU time of the whole machine, of the Tally server, of the PostgreSQL processes;
PostgreSQL's WAL counters) and samples ``pg_stat_activity`` a few times a second in
between, to see how many backends were busy and how many waited for a lock.
"""

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil  # type: ignore[import-untyped,unused-ignore]

SAMPLE_INTERVAL_SECONDS = 0.25
QUERY_TIMEOUT_SECONDS = 5.0

_ACTIVITY = """
SELECT count(*) FILTER (WHERE state = 'active') AS active,
       count(*) FILTER (WHERE state = 'active' AND wait_event_type = 'Lock') AS lock_waits,
       count(*) FILTER (WHERE state = 'active' AND wait_event_type = 'IO') AS io_waits
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'
"""
_WAL = "SELECT wal_sync, pg_current_wal_lsn() - '0/0'::pg_lsn AS lsn FROM pg_stat_wal"


@dataclass
class Probe:
    """CPU as cores busy on average (2.0 = both cores of a 2-core machine)."""

    machine_cores: float | None = None
    server_cores: float | None = None
    postgres_cores: float | None = None
    wal_syncs: int | None = None
    wal_bytes: int | None = None
    active_backends: float | None = None
    lock_waiting_backends: float | None = None
    error: str | None = None


def plain_url(url: str) -> str:
    """The URL as asyncpg itself takes it (no SQLAlchemy driver suffix)."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", *parts[1:]))


def find_postmaster(database_url: str) -> Any:
    """The postmaster process of the server at ``database_url`` if it runs on this
    machine (found as the parent of our backend, while connected); else None."""

    async def lookup() -> Any:
        conn = await asyncpg.connect(plain_url(database_url), timeout=QUERY_TIMEOUT_SECONDS)
        try:
            pid = await conn.fetchval("SELECT pg_backend_pid()", timeout=QUERY_TIMEOUT_SECONDS)
            try:
                parent = psutil.Process(pid).parent()
                if parent is not None and "postgres" in parent.name():
                    return parent
            except psutil.Error:
                pass
            return None
        finally:
            await conn.close(timeout=QUERY_TIMEOUT_SECONDS)

    return asyncio.run(asyncio.wait_for(lookup(), 4 * QUERY_TIMEOUT_SECONDS))


def _cpu_seconds(process: Any, with_children: bool) -> float:
    """User + system CPU seconds of a process (and its current children)."""
    processes = [process, *(process.children() if with_children else [])]
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _postgres_cpu(postmaster: Any) -> dict[int, float]:
    per_pid: dict[int, float] = {}
    try:
        processes = [postmaster, *postmaster.children()]
    except psutil.Error:
        return per_pid
    for p in processes:
        try:
            t = p.cpu_times()
            per_pid[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return per_pid


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


class WindowProbe:
    """Measures ``[window_start, window_end]`` (``time.monotonic()`` instants) in a
    thread; ``result()`` joins it."""

    def __init__(
        self,
        database_url: str,
        server_pid: int,
        postmaster: Any,
        window_start: float,
        window_end: float,
    ) -> None:
        self.database_url = database_url
        self.server = psutil.Process(server_pid)
        self.postmaster = postmaster
        self.window_start = window_start
        self.window_end = window_end
        self.probe = Probe()
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def result(self, timeout: float = 30.0) -> Probe:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.probe.error = "the probe did not finish"
        return self.probe

    def _run(self) -> None:
        try:
            asyncio.run(asyncio.wait_for(self._measure(), self._budget()))
        except Exception as e:
            self.probe.error = f"{type(e).__name__}: {e}"

    def _budget(self) -> float:
        return max(0.0, self.window_end - time.monotonic()) + 4 * QUERY_TIMEOUT_SECONDS

    async def _measure(self) -> None:
        conn = await asyncpg.connect(
            plain_url(self.database_url),
            timeout=QUERY_TIMEOUT_SECONDS,
            server_settings={"jit": "off"},
        )
        try:
            await asyncio.sleep(max(0.0, self.window_start - time.monotonic()))
            wal0 = await conn.fetchrow(_WAL, timeout=QUERY_TIMEOUT_SECONDS)
            t0 = time.monotonic()
            machine0 = _machine_busy()
            server0 = _cpu_seconds(self.server, with_children=False)
            pg0 = _postgres_cpu(self.postmaster) if self.postmaster is not None else {}

            samples: list[tuple[int, int]] = []
            while time.monotonic() + SAMPLE_INTERVAL_SECONDS < self.window_end:
                await asyncio.sleep(SAMPLE_INTERVAL_SECONDS)
                row = await conn.fetchrow(_ACTIVITY, timeout=QUERY_TIMEOUT_SECONDS)
                samples.append((int(row["active"]), int(row["lock_waits"])))
            await asyncio.sleep(max(0.0, self.window_end - time.monotonic()))

            t1 = time.monotonic()
            machine1 = _machine_busy()
            server1 = _cpu_seconds(self.server, with_children=False)
            pg1 = _postgres_cpu(self.postmaster) if self.postmaster is not None else {}
            # Cumulative statistics reach pg_stat_wal within about a second.
            wal1 = await conn.fetchrow(_WAL, timeout=QUERY_TIMEOUT_SECONDS)
        finally:
            await conn.close(timeout=QUERY_TIMEOUT_SECONDS)

        elapsed = t1 - t0
        p = self.probe
        p.machine_cores = (machine1 - machine0) / elapsed
        p.server_cores = (server1 - server0) / elapsed
        if self.postmaster is not None:
            # A backend that ended during the window is lost; the server's pool keeps
            # its connections, so this is rare.
            p.postgres_cores = sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items()) / elapsed
        p.wal_syncs = int(wal1["wal_sync"] - wal0["wal_sync"])
        p.wal_bytes = int(wal1["lsn"] - wal0["lsn"])
        if samples:
            p.active_backends = sum(a for a, _ in samples) / len(samples)
            p.lock_waiting_backends = sum(w for _, w in samples) / len(samples)
