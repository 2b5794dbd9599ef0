"""The server as an operator sees it: health, reflection, graceful shutdown, the CLI."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tally_client import TallyClient, TallyError, Unavailable
from tally_client.cli import main as tallyctl
from tally_service.config import Settings
from tally_service.db import async_url
from tests.conftest import ROOT, ServerProcess, free_port, start_server


def test_health_and_reflection(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tally.v1.CreditsService", "tally.v1.LedgerService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {
        "tally.v1.AccountsService",
        "tally.v1.CreditsService",
        "tally.v1.LedgerService",
        "grpc.health.v1.Health",
    } <= names


def test_not_serving_without_a_database(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    bad_url = database_url.rsplit("/", 1)[0] + "/no_such_database?" + database_url.split("?", 1)[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tally_service",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--database-url",
            bad_url,
        ],
        env={**os.environ, "TALLY_METRICS_ADDRESS": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 20
            status = None
            while time.monotonic() < deadline and status is None:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    time.sleep(0.2)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with TallyClient(channel=channel, max_attempts=1) as client:
                with pytest.raises(Unavailable) as info:
                    client.get_balance("anyone")
                assert info.value.reason == "DATABASE_UNAVAILABLE"
    finally:
        process.terminate()
        process.wait(20)


def test_sigterm_drains_in_flight_rpcs(
    database_url: str, server_log_dir: Path, client: TallyClient, funded: str
) -> None:
    replica = start_server(database_url, server_log_dir)
    engine = create_async_engine(async_url(database_url))
    locked = threading.Event()
    release = threading.Event()

    async def hold_row_lock() -> None:
        async with engine.begin() as conn:
            await conn.execute(
                text("SELECT 1 FROM accounts WHERE account_id = :a FOR UPDATE"), {"a": funded}
            )
            locked.set()
            await asyncio.to_thread(release.wait, 30)
        await engine.dispose()

    locker = threading.Thread(target=lambda: asyncio.run(hold_row_lock()))
    locker.start()
    assert locked.wait(10)
    outcome: dict[str, object] = {}

    def debit() -> None:
        with TallyClient(replica.target, timeout_seconds=30, max_attempts=1) as c:
            outcome["entry"] = c.debit(funded, "1", request_id=f"drain-{funded}")

    caller = threading.Thread(target=debit)
    caller.start()
    time.sleep(0.5)  # the debit is now waiting on the row lock inside the server
    replica.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with (
        TallyClient(replica.target, timeout_seconds=2, max_attempts=1) as late,
        pytest.raises(TallyError),  # refused or unavailable, never served
    ):
        late.get_balance(funded)
    release.set()
    locker.join(10)
    caller.join(30)
    assert replica.process.wait(30) == 0
    entry = outcome["entry"]
    assert getattr(entry, "balance_after") == "99"  # noqa: B009
    assert client.get_balance(funded).balance == "99"


def test_tallyctl(
    server: ServerProcess, account_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--target", server.target]
    assert tallyctl([*base, "accounts", "create", account_id, "--email", "ops@acme.test"]) == 0
    assert tallyctl([*base, "topup", account_id, "100", "--reference", "pay_1"]) == 0
    assert tallyctl([*base, "debit", account_id, "2.95", "--description", "PAN-Plus"]) == 0
    capsys.readouterr()
    assert tallyctl([*base, "balance", account_id]) == 0
    out = capsys.readouterr().out
    assert "97.05" in out
    assert tallyctl([*base, "ledger", account_id]) == 0
    out = capsys.readouterr().out
    assert "PAN-Plus" in out and "-2.95" in out and "pay_1" in out
    assert tallyctl([*base, "verify", account_id]) == 0
    assert tallyctl([*base, "debit", account_id, "1000"]) == 1
    err = capsys.readouterr().err
    assert "INSUFFICIENT_CREDITS" in err
    assert tallyctl([*base, "debit", account_id, "1.0000001"]) == 1
    assert "amount" in capsys.readouterr().err


def test_server_bounds_a_call_and_the_retry_does_the_work_once(
    own_database_url: str, server_log_dir: Path
) -> None:
    replica = start_server(own_database_url, server_log_dir, {"TALLY_MAX_CALL_SECONDS": "1"})
    engine = create_async_engine(async_url(own_database_url))
    locked, release = threading.Event(), threading.Event()
    try:
        with TallyClient(replica.target, timeout_seconds=10, max_attempts=1) as client:
            client.create_account("slow")
            client.top_up("slow", "10")

            async def hold_row_lock() -> None:
                async with engine.begin() as conn:
                    await conn.execute(
                        text("SELECT 1 FROM accounts WHERE account_id = 'slow' FOR UPDATE")
                    )
                    locked.set()
                    await asyncio.to_thread(release.wait, 30)
                await engine.dispose()

            locker = threading.Thread(target=lambda: asyncio.run(hold_row_lock()))
            locker.start()
            assert locked.wait(10)
            with pytest.raises(TallyError) as info:
                client.debit("slow", "4", request_id="slow-debit")
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert info.value.reason == "CALL_TIMEOUT"
            release.set()
            locker.join(10)
            assert client.get_balance("slow").balance == "10"  # the cancelled call left nothing
            assert client.debit("slow", "4", request_id="slow-debit").balance_after == "6"
            assert client.debit("slow", "4", request_id="slow-debit").balance_after == "6"
            assert client.verify_account("slow").consistent
    finally:
        release.set()
        replica.stop()


# -- settings checked at start ------------------------------------------------------------

UNUSED_DATABASE = "postgresql://nobody@127.0.0.1:1/none"  # never reached: checks come first


def _run_tally(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    return subprocess.run(
        [sys.executable, "-m", "tally_service", *(args or ("serve",))],
        env={**clean, "TALLY_DATABASE_URL": UNUSED_DATABASE, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_bad_settings_are_one_line_each_and_exit_2() -> None:
    result = _run_tally(
        {
            "TALLY_DB_POOL_SIZE": "abc",
            "TALLY_LOG_LEVEL": "loud",
            "TALLY_MIGRATE_ON_START": "maybe",
            "TALLY_SHUTDOWN_GRACE_SECONDS": "-1",
            "TALLY_LISTEN_ADDRESS": "localhost",
            "TALLY_FUNDING_HOOK": "paypal",
        }
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 6, lines
    by_name = {line.split("=", 1)[0].removeprefix("tally: "): line for line in lines}
    assert "an integer >= 1" in by_name["TALLY_DB_POOL_SIZE"]
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL" in by_name["TALLY_LOG_LEVEL"]
    assert "true/false, yes/no or on/off" in by_name["TALLY_MIGRATE_ON_START"]
    assert ">= 0" in by_name["TALLY_SHUTDOWN_GRACE_SECONDS"]
    assert "host:port" in by_name["TALLY_LISTEN_ADDRESS"]
    assert "internal, grpc" in by_name["TALLY_FUNDING_HOOK"]


def test_bad_auth_tokens_and_missing_files_are_one_line_each() -> None:
    result = _run_tally({"TALLY_AUTH_TOKENS": '[{"name": "x", "sha256": "abc", "methods": ["*"]}]'})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "tally: TALLY_AUTH_TOKENS is not valid: caller 'x': sha256 must be 64 hex digits "
        "(tally hash-token)"
    ]
    result = _run_tally({"TALLY_TLS_CERT_FILE": "/nonexistent/cert.pem"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "tally: TALLY_TLS_CERT_FILE='/nonexistent/cert.pem' is not valid: no such file",
        "tally: TLS needs both TALLY_TLS_CERT_FILE and TALLY_TLS_KEY_FILE",
    ]


@pytest.mark.parametrize(
    ("spelling", "value"),
    [
        *[("1", True), ("TRUE", True), ("yes", True), ("On", True)],
        *[("0", False), ("false", False), ("NO", False), ("off", False)],
    ],
)
def test_booleans_accept_the_usual_spellings(spelling: str, value: bool) -> None:
    settings = Settings.from_env({"TALLY_MIGRATE_ON_START": spelling})
    assert settings.migrate_on_start is value


def test_the_default_metrics_port_is_not_prometheus_own() -> None:
    assert Settings.from_env({}).metrics_address == "127.0.0.1:9464"
    assert Settings.from_env({"TALLY_METRICS_ADDRESS": ""}).metrics_address == ""


@pytest.mark.parametrize("variable", ["TALLY_LISTEN_ADDRESS", "TALLY_METRICS_ADDRESS"])
def test_a_taken_port_is_one_line_and_a_non_zero_exit(variable: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        env = {"TALLY_LISTEN_ADDRESS": f"127.0.0.1:{free_port()}", "TALLY_METRICS_ADDRESS": ""}
        result = _run_tally({**env, variable: address})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"tally: cannot listen on {address} ({variable}): Address already in use"
    ]


# -- connection management --------------------------------------------------------------


def test_connections_are_aged_out_so_clients_reconnect(
    database_url: str, server_log_dir: Path
) -> None:
    replica = start_server(
        database_url,
        server_log_dir,
        {"TALLY_MAX_CONNECTION_AGE_MS": "1000", "TALLY_MAX_CONNECTION_AGE_GRACE_MS": "500"},
    )
    states: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(replica.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            channel.subscribe(states.append, try_to_connect=False)
            deadline = time.monotonic() + 10
            while grpc.ChannelConnectivity.IDLE not in states and time.monotonic() < deadline:
                time.sleep(0.1)
            # The server said GOAWAY after about a second: the channel went idle...
            assert grpc.ChannelConnectivity.IDLE in states, states
            # ...and the next call connects again (to any replica behind the Service).
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        replica.stop()


def test_grpc_options_follow_the_settings() -> None:
    from tally_service.server import grpc_options

    options = dict(grpc_options(Settings.from_env({})))
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 60_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    off = dict(
        grpc_options(
            Settings.from_env(
                {
                    "TALLY_MAX_CONNECTION_AGE_MS": "0",
                    "TALLY_KEEPALIVE_PERMIT_WITHOUT_CALLS": "off",
                }
            )
        )
    )
    assert "grpc.max_connection_age_ms" not in off
    assert off["grpc.keepalive_permit_without_calls"] == 0


def test_unusable_tls_files_are_one_line(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    result = _run_tally({"TALLY_TLS_CERT_FILE": str(cert), "TALLY_TLS_KEY_FILE": str(key)})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("tally: TALLY_TLS_CERT_FILE and TALLY_TLS_KEY_FILE cannot be used:")


def test_a_misspelt_setting_is_noticed() -> None:
    settings = Settings.from_env({"TALLY_DB_POOL_SIZ": "5", "TALLY_TEST_DATABASE_URL": "x"})
    assert settings.unknown_variables == ["TALLY_DB_POOL_SIZ"]
    result = _run_tally({"TALLY_DB_POOL_SIZ": "5", "TALLY_LISTEN_ADDRESS": "bad"})
    assert result.returncode == 2  # the warning comes once logging is set up; errors first
