"""The container image end to end: built from the Dockerfile (`scripts/check-deploy image`,
cached), run the way the Helm chart runs it (read-only root filesystem, user 10001, no
capabilities) against the test PostgreSQL, called over gRPC, stopped with SIGTERM.

Skipped when podman is not installed (`scripts/check-deploy image` installs it with apt).
The embedded test PostgreSQL listens only on a unix socket in its private data directory, so
the container gets the socket file itself as a bind mount and `?host=` points at it; with a
TCP TALLY_TEST_DATABASE_URL the container shares the host's network instead.
"""

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally_client import TallyClient
from tests.conftest import ROOT, free_port, wait_serving

pytestmark = pytest.mark.slow

IMAGE = os.environ.get("TALLY_IMAGE", "localhost/tally:dev")
# A cold build (debootstrap of the base image, every wheel downloaded) takes minutes; a
# cached one seconds.
BUILD_TIMEOUT_SECONDS = 1200
# conmon kills a test container after this long, even if pytest itself was killed.
CONTAINER_TIMEOUT_SECONDS = 300
SOCKET_DIR_IN_CONTAINER = "/run/tally-db"


def _podman_env() -> dict[str, str]:
    env = dict(os.environ)
    # runc and explicit ulimits for podman as root on hybrid cgroups (as check-deploy).
    env.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "containers.conf"))
    return env


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args],
        env=_podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed; `scripts/check-deploy image` installs it (apt)")
    result = subprocess.run(
        [str(ROOT / "scripts" / "check-deploy"), "image"],
        env={**_podman_env(), "CHECK_DEPLOY_NO_INSTALL": "1", "TALLY_IMAGE": IMAGE},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode == 3:  # a tool is missing and may not be installed from here
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return IMAGE


def _container_database(url: str) -> tuple[str, list[str]]:
    """The test database URL as the container sees it, and the podman options for it."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    socket_dir = query.get("host", "")
    if parts.hostname or not socket_dir.startswith("/"):
        return url, ["--network=host"]
    socket = f".s.PGSQL.{query.get('port', parts.port or 5432)}"
    # Only the socket file: its directory is the database's data directory (mode 0700).
    mount = f"{socket_dir}/{socket}:{SOCKET_DIR_IN_CONTAINER}/{socket}"
    query["host"] = SOCKET_DIR_IN_CONTAINER
    new_query = "&".join(f"{key}={value}" for key, value in query.items())
    return urlunsplit(parts._replace(query=new_query)), ["--volume", mount]


def _run_options(name: str, database_url: str) -> tuple[list[str], int]:
    """podman run options like the chart's pod, and the host port of its gRPC."""
    url, database_options = _container_database(database_url)
    port = free_port()
    if "--network=host" in database_options:
        network = ["--env", f"TALLY_LISTEN_ADDRESS=127.0.0.1:{port}"]
    else:
        network = ["--publish", f"127.0.0.1:{port}:50051"]
    options = [
        "--rm",
        f"--name={name}",
        f"--timeout={CONTAINER_TIMEOUT_SECONDS}",
        "--no-healthcheck",  # needs systemd timers; Kubernetes uses its own gRPC probes
        "--read-only",
        "--tmpfs=/tmp:rw,size=64m,mode=1777",
        "--user=10001:10001",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        f"--env=TALLY_DATABASE_URL={url}",
        "--env=TALLY_SHUTDOWN_GRACE_SECONDS=5",
        *database_options,
        *network,
    ]
    return options, port


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"tally-test-{uuid.uuid4().hex[:12]}"
    yield name
    _podman("rm", "--force", "--time=0", name)


def test_migrate_runs_in_the_container(image: str, database_url: str, container_name: str) -> None:
    options, _ = _run_options(container_name, database_url)
    result = _podman("run", *options, image, "migrate", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr


def test_container_serves_grpc_and_drains_on_sigterm(
    image: str, database_url: str, container_name: str, tmp_path: Path
) -> None:
    options, port = _run_options(container_name, database_url)
    target = f"127.0.0.1:{port}"
    log_path = tmp_path / "container.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["podman", "run", *options, image],
            env=_podman_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_serving(target, process, timeout=90)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text(errors='replace')}") from None

        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "tally.v1.AccountsService", "tally.v1.CreditsService"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service

        account_id = f"acct-ctr-{uuid.uuid4().hex[:12]}"
        with TallyClient(target, timeout_seconds=10) as client:
            client.create_account(account_id)
            client.top_up(account_id, "12.5")
            assert client.get_balance(account_id).available == "12.5"

        stopped = _podman("stop", "--time=20", container_name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        # SIGTERM reached `tally` (PID 1), which drained and exited cleanly.
        assert process.wait(timeout=30) == 0, log_path.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
