"""Grant expiry: every due grant is written off before money moves or a balance is read,
however many fall due at once (DESIGN.md 5).

Most tests run on a server of their own whose sweeper sleeps for an hour after its first
pass, so what they see is the lazy catch-up under the account lock, not the sweeper.
"""

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tally.v1 import credits_pb2 as c
from tally.v1 import ledger_pb2
from tally_client import InsufficientCredits, TallyClient
from tests.conftest import ServerProcess, new_database, start_server
from tests.support import assert_consistent
from tests.test_grants import grant, grants, ts

PROMO = c.CREDIT_GRANT_TYPE_PROMOTIONAL


@pytest.fixture(scope="module")
def lazy_database_url(admin_url: str) -> str:
    return new_database(admin_url)


@pytest.fixture(scope="module")
def lazy_server(lazy_database_url: str, server_log_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(
        lazy_database_url, server_log_dir, {"TALLY_SWEEP_INTERVAL_SECONDS": "3600"}
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def lazy(lazy_server: ServerProcess) -> Iterator[TallyClient]:
    with TallyClient(lazy_server.target, timeout_seconds=10) as client:
        yield client


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def wait_past(instant: datetime, margin: float = 0.3) -> None:
    time.sleep(max(0.0, (instant - datetime.now(UTC)).total_seconds() + margin))


def new_account(client: TallyClient, overdraft_limit: str | None = None) -> str:
    account_id = f"exp-{uuid.uuid4().hex[:16]}"
    client.create_account(account_id, overdraft_limit=overdraft_limit)
    return account_id


def expired_entries(client: TallyClient, account_id: str) -> list[ledger_pb2.LedgerEntry]:
    entries = client.list_entries(account_id, type="debit", page_size=100).entries
    return [e for e in entries if e.description == "expired"]


def when(entry: ledger_pb2.LedgerEntry) -> datetime:
    return entry.create_time.ToDatetime(tzinfo=UTC)


def many_promotions(client: TallyClient, account_id: str, count: int) -> datetime:
    """1 purchased credit, then `count` promotional grants of 0.1 expiring together."""
    expires = soon(8)
    grant(client, account_id, "1")
    for _ in range(count):
        grant(client, account_id, "0.1", grant_type=PROMO, expire_time=ts(expires))
    assert datetime.now(UTC) < expires, "the grants took too long to create"
    return expires


def test_a_debit_after_many_simultaneous_expiries_sees_none_of_them(lazy: TallyClient) -> None:
    account_id = new_account(lazy)
    expires = many_promotions(lazy, account_id, 101)
    wait_past(expires)
    with pytest.raises(InsufficientCredits):
        lazy.debit(account_id, "1.000001")
    balance = lazy.get_balance(account_id)
    assert (balance.balance, balance.available) == ("1", "1")
    written = expired_entries(lazy, account_id)  # the newest 100 of the 101
    assert len(written) == 100
    assert {(e.amount, when(e)) for e in written} == {("-0.1", expires)}
    assert written[0].sequence == 1 + 101 + 101
    assert lazy.debit(account_id, "1").balance_after == "0"
    assert_consistent(lazy, account_id)


def test_the_first_balance_after_many_expiries_is_exact(lazy: TallyClient) -> None:
    account_id = new_account(lazy)
    expires = many_promotions(lazy, account_id, 150)
    wait_past(expires)
    balance = lazy.get_balance(account_id)
    assert (balance.balance, balance.available, balance.purchased_credits) == ("1", "1", "1")
    assert [g.remaining for g in grants(lazy, account_id)] == ["1"]
    report = lazy.verify_account(account_id)
    assert report.consistent, list(report.violations)
    assert report.entry_count == 1 + 150 + 150


def test_the_sweeper_writes_off_every_due_grant(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    expires = many_promotions(client, account_id, 120)
    wait_past(expires)
    deadline = time.monotonic() + 10
    # Listing entries does not catch up: only the sweeper can have written these.
    while len(client.list_entries(account_id, page_size=1).entries) == 0 or (
        client.list_entries(account_id, page_size=1).entries[0].balance_after != "1"
    ):
        assert time.monotonic() < deadline, "the sweeper did not write the grants off"
        time.sleep(0.2)
    assert client.list_entries(account_id, page_size=1).entries[0].sequence == 1 + 120 + 120
    assert_consistent(client, account_id)
