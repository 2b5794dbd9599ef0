"""Test fixtures: a real PostgreSQL and real Tally server processes on loopback.

PostgreSQL is the embedded pgserver in a temporary directory, or the server named by
TALLY_TEST_DATABASE_URL. Each test session migrates a fresh database of its own.
"""

import os

# The tests fork (pg_ctl, pgserver, server processes) while gRPC client threads run in this
# process; gRPC's fork handlers are for a child that keeps using gRPC, which ours never do,
# and with them on a fork during live calls crashed this process once (a segmentation
# fault in the PostgreSQL-restart drill). Off before grpc is first imported; the server
# processes inherit it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from tally_client import TallyClient
from tally_service.db import async_url, migrate

ROOT = Path(__file__).resolve().parent.parent

# Hypothesis profiles, chosen by TALLY_HYPOTHESIS_PROFILE (default "ci").
# "ci": derandomized, so every run on every machine draws the same examples and a red
# run is reproduced by running it again, with no seed to carry over. No example
# database (database=None): a derandomized run finds its failures again by itself, and
# none of its outcomes then depends on files an earlier run left behind. A failure
# worth keeping is pinned in the test as an @example or a plain regression test.
# "long" (scripts/test-long): random and many times longer (tests scale their example
# counts by support.scaled), saving what it finds under .hypothesis/ (not committed)
# so the next long run replays a failure first until it is fixed and pinned.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "print_blob": True}
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)  # type: ignore[arg-type]
settings.register_profile(
    "long",
    derandomize=False,
    database=DirectoryBasedExampleDatabase(str(ROOT / ".hypothesis" / "examples")),
    **_COMMON,  # type: ignore[arg-type]
)
settings.load_profile(os.environ.get("TALLY_HYPOTHESIS_PROFILE", "ci"))


def _admin_url() -> Iterator[str]:
    given = os.environ.get("TALLY_TEST_DATABASE_URL")
    if given:
        yield given
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="tally-test-pg-") as directory:
        server = pgserver.get_server(directory, cleanup_mode="stop")  # type: ignore[attr-defined,unused-ignore]
        try:
            yield server.get_uri()
        finally:
            # Stopped before its directory goes: left to pgserver's exit hook, a server
            # outlived the test run now and then (its directory deleted under it).
            server.cleanup()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def _create_database(admin_url: str, name: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(async_url(admin_url), isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await engine.dispose()


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    yield from _admin_url()


def new_database(admin_url: str) -> str:
    """A fresh, migrated database on the test PostgreSQL."""
    name = f"tally_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(admin_url, name))
    url = _with_database(admin_url, name)
    migrate(url)
    return url


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> str:
    return new_database(admin_url)


@pytest.fixture
def own_database_url(admin_url: str) -> str:
    """A database of the test's own, for servers configured unlike the shared ones
    (their background workers would otherwise share work with the shared servers)."""
    return new_database(admin_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    target: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_serving(
    target: str,
    process: subprocess.Popen[bytes],
    timeout: float = 30,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {target} did not become SERVING")


def start_server(
    database_url: str,
    tmp_dir: Path,
    extra_env: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log_path = tmp_dir / f"server-{port}.log"
    env = {
        **os.environ,
        "TALLY_DATABASE_URL": database_url,
        "TALLY_LISTEN_ADDRESS": target,
        "TALLY_SWEEP_INTERVAL_SECONDS": "0.5",
        "TALLY_SHUTDOWN_GRACE_SECONDS": "10",
        "TALLY_METRICS_ADDRESS": "",
        **(extra_env or {}),
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tally_service", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    server = ServerProcess(target, process, log_path)
    try:
        wait_serving(target, process, credentials=credentials)
    except Exception:
        server.stop(9)
        raise RuntimeError(server.log()) from None
    return server


@pytest.fixture(scope="session")
def server_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def server(database_url: str, server_log_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(database_url, server_log_dir)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def second_server(database_url: str, server_log_dir: Path) -> Iterator[ServerProcess]:
    """Another replica on the same database."""
    process = start_server(database_url, server_log_dir)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[TallyClient]:
    with TallyClient(server.target, timeout_seconds=10) as c:
        yield c


@pytest.fixture
def account_id() -> str:
    return f"acct-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def funded(client: TallyClient, account_id: str) -> str:
    """An account holding 100 credits."""
    client.create_account(account_id)
    client.top_up(account_id, "100")
    return account_id
