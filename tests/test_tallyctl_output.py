"""tallyctl: --version, exit codes in --help, -o json on every command, `usage record`, and
the export's progress line, against a real server."""

import argparse
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tally_client import TallyClient
from tally_client.cli import build_parser, human_bytes
from tally_client.cli import main as tallyctl
from tests.conftest import ServerProcess


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every runnable command of the parser, e.g. ``accounts create``, ``balance``."""
    names: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                names |= _commands(sub, f"{prefix}{name} ") or {f"{prefix}{name}"}
    return names


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tallyctl(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == "tallyctl 0.1.0"

    with pytest.raises(SystemExit) as exit_info:
        tallyctl(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out
    for line in ("0  success", "1  the server answered", "2  usage error", "3  verify found"):
        assert line in out
    assert "-o {table,json}" in out and "usage record ACCOUNT PRODUCT" in out


def test_usage_record(
    server: ServerProcess, client: TallyClient, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--target", server.target]
    account, product = new_id("acct"), new_id("P")
    client.create_account(account)
    client.top_up(account, "10")
    client.upsert_product(product, "0.25")
    event_id = new_id("txn")
    args = [*base, "usage", "record", account, product, "--quantity", "3", "--event-id", event_id]
    args += ["--endpoint", "/pan/verify"]
    assert tallyctl(args) == 0
    out = capsys.readouterr().out
    assert event_id in out and "completed" in out and "0.75" in out and "duplicate:" in out
    assert client.get_balance(account).balance == "9.25"

    # The event id is the idempotency key: again, nothing more is charged.
    assert tallyctl(["-o", "json", *args]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["duplicate"] is True and again["event"]["eventId"] == event_id
    assert client.get_balance(account).balance == "9.25"

    # A generated event id; a failed call (not charged: the product does not charge failures).
    assert tallyctl([*base, "-o", "json", "usage", "record", account, product, "--failed"]) == 0
    failed = json.loads(capsys.readouterr().out)
    assert failed["event"]["status"] == "USAGE_STATUS_FAILED"
    uuid.UUID(failed["event"]["eventId"])
    assert client.get_balance(account).balance == "9.25"

    # `usage ACCOUNT` is still the statistics command.
    assert tallyctl([*base, "usage", account, "--preset", "today"]) == 0
    assert "total_requests:" in capsys.readouterr().out
    assert tallyctl([*base, "usage", "record", new_id("nobody"), product]) == 1
    assert "ACCOUNT_NOT_FOUND" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tallyctl([*base, "usage", "record", account])  # no product
    assert exit_info.value.code == 2


def test_json_output_of_every_command(
    server: ServerProcess,
    client: TallyClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    account, product = new_id("acct"), new_id("P")
    client.upsert_product(product, "0.5")
    report = tmp_path / "usage.csv"
    closed_day = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    # (command, arguments, a check of the JSON answer)
    runs: list[tuple[str, list[str], str]] = [
        ("accounts create", ["accounts", "create", account], "accountId"),
        ("accounts get", ["accounts", "get", account], "accountId"),
        ("accounts list", ["accounts", "list", "--limit", "3"], "accounts"),
        ("topup", ["topup", account, "10"], "balanceAfter"),
        ("debit", ["debit", account, "1"], "balanceAfter"),
        ("adjust", ["adjust", account, "0.5", "--reason", "goodwill"], "balanceAfter"),
        ("balance", ["balance", account], "available"),
        ("grants", ["grants", account], "grants"),
        (
            "auto-reload",
            ["auto-reload", account, "--threshold", "1", "--amount", "5"],
            "enabled",
        ),
        ("reloads", ["reloads", account], "{}"),
        ("subscribe", ["subscribe", account, "pro", "40"], "plan"),
        ("unsubscribe", ["unsubscribe", account], "status"),
        ("ledger", ["ledger", account], "entries"),
        ("verify", ["verify", account], "consistent"),
        ("products upsert", ["products", "upsert", product, "0.5"], "productId"),
        ("products list", ["products", "list"], "products"),
        ("usage-record", ["usage", "record", account, product], "event"),
        ("usage", ["usage", account, "--preset", "today"], "totals"),
        ("usage-events", ["usage-events", account], "events"),
        ("export", ["export", account, "--out", str(report), "--preset", "today"], "bytes"),
        ("summary", ["summary", account], "creditBalance"),
        # A day closed in any time zone: two days ago.
        ("period-report", ["period-report", account, closed_day], "latestVersion"),
    ]
    assert {name for name, _, _ in runs} == _commands(build_parser())
    for name, args, key in runs:
        assert tallyctl(["--target", server.target, "-o", "json", *args]) == 0, name
        out = capsys.readouterr().out
        answer = json.loads(out)
        assert isinstance(answer, dict), name
        assert (answer == {}) if key == "{}" else (key in answer), (name, out)
    # The exact protobuf JSON: lowerCamelCase names and enum names, as MessageToJson.
    assert tallyctl(["--target", server.target, "--output", "json", "balance", account]) == 0
    balance = json.loads(capsys.readouterr().out)
    assert balance["accountId"] == account
    assert balance["available"] == client.get_balance(account).available
    assert balance["autoReload"]["enabled"] is True


def test_export_progress(
    server: ServerProcess, client: TallyClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    account, product = new_id("acct"), new_id("P")
    client.create_account(account)
    client.top_up(account, "100")
    client.upsert_product(product, "0.1")
    events = [client.usage_event(account, new_id("txn"), product) for _ in range(25)]
    assert client.record_usage_batch(events).results
    base = ["--target", server.target, "export", account, "--preset", "today"]

    # stderr is not a terminal here: no progress unless asked for.
    assert tallyctl([*base, "--out", str(tmp_path / "a.csv")]) == 0
    assert capsys.readouterr().err == ""

    assert tallyctl([*base, "--out", str(tmp_path / "b.csv"), "--progress"]) == 0
    captured = capsys.readouterr()
    size = (tmp_path / "b.csv").stat().st_size
    final = captured.err.rstrip("\n").rsplit("\r", 1)[-1]
    assert final == f"export: 25 rows, {human_bytes(size)}\x1b[K"
    assert captured.out.count("bytes:") == 1

    # XLSX: bytes only (rows are inside the zip).
    assert tallyctl([*base, "--out", str(tmp_path / "c.xlsx"), "--progress"]) == 0
    final = capsys.readouterr().err.rstrip("\n").rsplit("\r", 1)[-1]
    assert final == f"export: {human_bytes((tmp_path / 'c.xlsx').stat().st_size)}\x1b[K"

    assert tallyctl([*base, "--out", str(tmp_path / "d.csv"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * 1024 * 1024) == "5.0 MiB"
