"""A PostgreSQL of a test's own that it may stop and start: the pgserver package's bundled
binaries (initdb, pg_ctl) on a free loopback port, with its data in a temporary directory.

PostgreSQL refuses to run as root; under root (as in CI containers) it runs as the
`pgserver` system user, as pgserver itself does.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
from pgserver._commands import POSTGRES_BIN_PATH


def _system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    from pgserver.utils import ensure_user_exists

    ensure_user_exists("pgserver")
    return "pgserver"


class OwnPostgres:
    """initdb, start, stop (fast or immediate) and start again, on one port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.user = _system_user()
        self.base = Path(tempfile.mkdtemp(prefix="tally-own-pg-"))
        self.data = self.base / "data"
        self.log_path = self.base / "postgres.log"
        if self.user is not None:
            shutil.chown(self.base, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "utf8")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str, **kwargs: Any) -> None:
        subprocess.run(
            [str(POSTGRES_BIN_PATH / program), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self.user,
            timeout=60,
            **kwargs,
        )

    def start(self, *settings: str) -> None:
        """Starts PostgreSQL and waits until it accepts connections (`settings` are
        `name=value` server options)."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.base}"
        options += "".join(f" -c {setting}" for setting in settings)
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-o", options, "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stops PostgreSQL: `fast` rolls back and disconnects every session (57P01),
        `immediate` quits at once, as a crash would."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        except subprocess.CalledProcessError as exc:
            # pg_ctl itself has died of a signal on a loaded machine: send the
            # postmaster the same signal it would have sent, and wait as it would.
            pid_file = self.data / "postmaster.pid"
            if exc.returncode >= 0 or not pid_file.exists():
                raise
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGINT if mode == "fast" else signal.SIGQUIT)
            deadline = time.monotonic() + 60
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    def psql(self, sql: str, database: str = "postgres") -> None:
        self._run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        )

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


class RowLock:
    """Another session holding an account's row lock (`SELECT ... FOR UPDATE` in an open
    transaction, with asyncpg in a thread of its own) until released: a slow database."""

    def __init__(self, url: str, account_id: str) -> None:
        self.url = url
        self.account_id = account_id
        self.locked = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    async def _hold(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE", self.account_id
                )
                self.locked.set()
                await asyncio.to_thread(self.release.wait, 120)
        except Exception as exc:  # e.g. the connection cut by a stopping PostgreSQL
            self.error = exc
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)

    def __enter__(self) -> "RowLock":
        self._thread.start()
        if not self.locked.wait(20):
            raise TimeoutError(f"could not lock {self.account_id}: {self.error}")
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self._thread.join(20)
