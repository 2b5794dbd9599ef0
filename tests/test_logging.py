"""Structured logs: every line of a real server's standard error is one JSON object, and the
access log has one line per RPC."""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally_client import NotFound, TallyClient
from tally_service import logs
from tally_service.auth import hash_token
from tests.conftest import start_server

TOKEN = "log-test-token"


def test_json_logs_and_the_access_log(own_database_url: str, server_log_dir: Path) -> None:
    callers = [{"name": "log-tester", "sha256": hash_token(TOKEN), "methods": ["*"]}]
    server = start_server(
        own_database_url,
        server_log_dir,
        {
            "TALLY_LOG_FORMAT": "json",
            "TALLY_ACCESS_LOG": "true",
            "TALLY_LOG_LEVEL": "info",
            "TALLY_AUTH_TOKENS": json.dumps(callers),
        },
    )
    metadata = [("authorization", f"Bearer {TOKEN}")]
    with TallyClient(server.target, metadata=metadata, max_attempts=1) as client:
        client.create_account("logged")
        with pytest.raises(NotFound):
            client.get_balance("nobody")
    assert server.stop() == 0
    entries = [json.loads(line) for line in server.log().splitlines()]  # each line is JSON
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert entry["time"].endswith("Z")
    access = [e for e in entries if e["logger"] == "tally.access"]
    by_method = {e["method"].rsplit("/", 1)[1]: e for e in access}
    assert by_method["CreateAccount"]["code"] == "OK"
    assert by_method["GetBalance"]["code"] == "NOT_FOUND"
    for entry in (by_method["CreateAccount"], by_method["GetBalance"]):
        assert entry["caller"] == "log-tester"
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] > 0
        assert entry["peer"].startswith("ipv4:127.0.0.1:")
    # Health checks of the readiness probe are RPCs too (no caller).
    assert any(e["method"] == "/grpc.health.v1.Health/Check" for e in access)
    messages = [e["message"] for e in entries]
    assert any(m.startswith("tally listening on") for m in messages)
    assert "stopped" in messages


def test_text_logs_have_no_access_log_by_default(
    own_database_url: str, server_log_dir: Path
) -> None:
    server = start_server(own_database_url, server_log_dir, {"TALLY_LOG_LEVEL": "warning"})
    with TallyClient(server.target, max_attempts=1) as client:
        client.create_account("quiet")
    assert server.stop() == 0
    log = server.log()
    assert "tally.access" not in log
    assert " INFO " not in log  # TALLY_LOG_LEVEL=warning is honoured
    assert "every caller may call every method" in log  # a warning


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LIBRARIES}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)
    logging.captureWarnings(False)


@pytest.mark.usefixtures("restore_logging")
def test_an_exception_is_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "json")
    log = logging.getLogger("tally_service.test")
    try:
        raise ValueError("boom\non two lines")
    except ValueError:
        log.exception("it failed", extra={"account": "a1"})
    logging.getLogger("pgserver").info("chatty")  # quiet below DEBUG
    logging.getLogger("alembic.runtime.migration").info("Running upgrade")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR" and entry["message"] == "it failed"
    assert entry["account"] == "a1"
    assert entry["exception"] == "ValueError: boom\non two lines"
    assert entry["traceback"].startswith("Traceback (most recent call last):")
    logs.setup("DEBUG", "json")
    assert logging.getLogger("pgserver").isEnabledFor(logging.DEBUG)
