"""GetBalance as of a past instant, and ListEntries from an instant."""

import time
from datetime import UTC, datetime, timedelta

import pytest

from tally_client import InvalidArgument, NotFound, TallyClient
from tally_client.cli import main as tallyctl
from tests.conftest import ServerProcess
from tests.support import assert_consistent


def _at(client: TallyClient, account_id: str, instant: datetime) -> tuple[str, str, str]:
    b = client.get_balance(account_id, as_of=instant)
    return b.balance, b.reserved, b.available


def test_balance_at_every_step(client: TallyClient, account_id: str) -> None:
    before_account = datetime.now(UTC) - timedelta(seconds=1)
    client.create_account(account_id)
    created = datetime.now(UTC)

    top_up = client.top_up(account_id, "100")
    t_top_up = top_up.create_time.ToDatetime(tzinfo=UTC)
    hold = client.reserve(account_id, "30")
    t_hold = hold.create_time.ToDatetime(tzinfo=UTC)
    captured = client.capture(hold.reservation_id, "20")
    t_capture = captured.entry.create_time.ToDatetime(tzinfo=UTC)
    second = client.reserve(account_id, "10")
    t_second = second.create_time.ToDatetime(tzinfo=UTC)
    debit = client.debit(account_id, "5")
    t_debit = debit.create_time.ToDatetime(tzinfo=UTC)
    released = client.release(second.reservation_id)
    t_release = released.finalize_time.ToDatetime(tzinfo=UTC)
    short = client.reserve(account_id, "7", ttl_seconds=1)
    t_short = short.create_time.ToDatetime(tzinfo=UTC)
    t_expiry = short.expire_time.ToDatetime(tzinfo=UTC)
    time.sleep(1.3)  # the short hold expires; nothing touches the account meanwhile

    tick = timedelta(microseconds=1)
    expected = [
        (before_account, ("0", "0", "0")),
        (created, ("0", "0", "0")),  # the account exists, no entry yet
        (t_top_up - tick, ("0", "0", "0")),
        (t_top_up, ("100", "0", "100")),
        (t_hold - tick, ("100", "0", "100")),
        (t_hold, ("100", "30", "70")),
        # The capture debits 20 and releases the rest of the hold.
        (t_capture, ("80", "0", "80")),
        (t_second, ("80", "10", "70")),
        (t_debit - tick, ("80", "10", "70")),
        (t_debit, ("75", "10", "65")),
        (t_release - tick, ("75", "10", "65")),
        (t_release, ("75", "0", "75")),
        (t_short, ("75", "7", "68")),
        (t_expiry - tick, ("75", "7", "68")),
        (t_expiry, ("75", "0", "75")),  # a hold stops counting at its expiry instant
        (datetime.now(UTC), ("75", "0", "75")),
    ]
    for instant, amounts in expected:
        assert _at(client, account_id, instant) == amounts, instant

    now = client.get_balance(account_id)
    past = client.get_balance(account_id, as_of=datetime.now(UTC))
    assert (past.balance, past.reserved, past.available) == (
        now.balance,
        now.reserved,
        now.available,
    )
    assert past.currency == now.currency and past.overdraft_limit == now.overdraft_limit
    at_debit = client.get_balance(account_id, as_of=t_debit)
    assert at_debit.update_time.ToDatetime(tzinfo=UTC) == t_debit
    assert client.get_balance(account_id, as_of=before_account).HasField("update_time") is False

    with pytest.raises(InvalidArgument) as future:
        client.get_balance(account_id, as_of=datetime.now(UTC) + timedelta(minutes=1))
    assert future.value.field_violations[0][0] == "as_of"
    with pytest.raises(InvalidArgument) as far:
        client.get_balance(account_id, as_of=datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert far.value.field_violations[0][0] == "as_of"
    # Timestamps in requests lie in [1970, 9998) (docs/design.md, Limits): before the
    # account existed is zeros; year 1 is refused naming the field.
    assert _at(client, account_id, datetime(1970, 1, 1, tzinfo=UTC)) == ("0", "0", "0")
    with pytest.raises(InvalidArgument) as ancient:
        client.get_balance(account_id, as_of=datetime(1, 1, 1, tzinfo=UTC))
    assert ancient.value.field_violations[0][0] == "as_of"
    with pytest.raises(NotFound):
        client.get_balance("nobody-here", as_of=t_debit)

    # ListEntries starts at an instant: start_time is inclusive, end_time exclusive.
    from_capture = client.list_entries(account_id, start_time=t_capture)
    assert [e.entry_id for e in from_capture.entries] == [
        debit.entry_id,
        captured.entry.entry_id,
    ]
    before_debit = client.list_entries(account_id, end_time=t_debit)
    assert [e.entry_id for e in before_debit.entries] == [
        captured.entry.entry_id,
        top_up.entry_id,
    ]
    assert_consistent(client, account_id)


def test_tallyctl_balance_as_of(
    server: ServerProcess, account_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--target", server.target]
    assert tallyctl([*base, "accounts", "create", account_id]) == 0
    assert tallyctl([*base, "topup", account_id, "10"]) == 0
    between = datetime.now(UTC)
    assert tallyctl([*base, "topup", account_id, "5"]) == 0
    capsys.readouterr()
    assert tallyctl([*base, "balance", account_id, "--as-of", between.isoformat()]) == 0
    lines = dict(
        (k.strip(), v.strip())
        for k, v in (line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    )
    assert (lines["balance"], lines["available"]) == ("10", "10")
