"""The client's grant, auto-reload and subscription methods, and the tallyctl
commands built on them, against a real server.

The session server uses the ``internal`` funding hook, so a reload is funded by
Tally itself shortly after it is decided; reloads and grant expiry happen in the
background, so every wait below polls with a deadline.
"""

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from google.protobuf import timestamp_pb2

from tally.v1 import accounts_pb2, credits_pb2
from tally_client import AsyncTallyClient, InvalidArgument, TallyClient
from tally_client import _requests as rq
from tally_client.cli import main as tallyctl
from tests.conftest import ServerProcess
from tests.support import assert_consistent

WAIT_SECONDS = 20.0


def wait_for(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds}s: {what}")


def reloads_settled(client: TallyClient, account_id: str, count: int) -> bool:
    """``count`` reload intents exist and none is still PENDING."""
    intents = client.list_reloads(account_id).reloads
    return len(intents) == count and all(
        r.status != credits_pb2.RELOAD_STATUS_PENDING for r in intents
    )


def to_dt(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def fields_of(out: str) -> dict[str, str]:
    """The ``name: value`` lines of a tallyctl answer."""
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


# --- request builders (no server) -------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("purchased", credits_pb2.CREDIT_GRANT_TYPE_PURCHASED),
        ("Subscription", credits_pb2.CREDIT_GRANT_TYPE_SUBSCRIPTION),
        ("PROMOTIONAL", credits_pb2.CREDIT_GRANT_TYPE_PROMOTIONAL),
        ("auto_reload", credits_pb2.CREDIT_GRANT_TYPE_AUTO_RELOAD),
        ("auto-reload", credits_pb2.CREDIT_GRANT_TYPE_AUTO_RELOAD),
        ("CREDIT_GRANT_TYPE_PROMOTIONAL", credits_pb2.CREDIT_GRANT_TYPE_PROMOTIONAL),
        (credits_pb2.CREDIT_GRANT_TYPE_SUBSCRIPTION, credits_pb2.CREDIT_GRANT_TYPE_SUBSCRIPTION),
        (None, credits_pb2.CREDIT_GRANT_TYPE_UNSPECIFIED),
    ],
)
def test_grant_type_names(given: rq.GrantTypeArg, expected: int) -> None:
    assert rq.credit_grant_type(given) == expected


def test_builders() -> None:
    with pytest.raises(ValueError, match="promotional"):
        rq.credit_grant_type("gift")
    assert rq.subscription_period("month") == accounts_pb2.SUBSCRIPTION_PERIOD_MONTHLY
    assert rq.subscription_period("Yearly") == accounts_pb2.SUBSCRIPTION_PERIOD_YEARLY
    with pytest.raises(ValueError, match="monthly"):
        rq.subscription_period("weekly")

    plain = rq.top_up("a", "1").request
    assert isinstance(plain, credits_pb2.TopUpRequest)
    assert not plain.HasField("priority") and not plain.HasField("expire_time")
    assert plain.grant_type == credits_pb2.CREDIT_GRANT_TYPE_UNSPECIFIED
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    full = rq.top_up("a", "1", grant_type="promotional", expire_time=when, priority=0).request
    assert isinstance(full, credits_pb2.TopUpRequest)
    assert full.HasField("priority") and full.priority == 0  # 0 is sent, not dropped
    assert to_dt(full.expire_time) == when
    assert full.grant_type == credits_pb2.CREDIT_GRANT_TYPE_PROMOTIONAL
    with pytest.raises(TypeError, match="priority"):
        rq.top_up("a", "1", priority=True)
    with pytest.raises(ValueError, match="timezone-aware"):
        rq.top_up("a", "1", expire_time=datetime(2030, 1, 1))  # noqa: DTZ001

    settings = rq.set_auto_reload("a", enabled=True, threshold=5, amount="2.5").request
    assert isinstance(settings, credits_pb2.SetAutoReloadRequest)
    assert (settings.settings.threshold, settings.settings.max_amount_per_month) == ("5", "0")
    assert settings.request_id

    cancel = rq.cancel_subscription("a", request_id="k-1").request
    assert isinstance(cancel, accounts_pb2.SetSubscriptionRequest)
    assert (cancel.request_id, cancel.subscription.plan) == ("k-1", "")
    assert rq.set_subscription("a", "pro", 10).mutating


# --- grants ----------------------------------------------------------------------------


def test_top_up_grant_fields_and_list_grants(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    expires = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    client.top_up(account_id, "10")  # purchased, priority 30
    client.top_up(
        account_id, "5", grant_type="promotional", expire_time=expires, priority=5
    )  # drawn first
    client.top_up(account_id, "7", grant_type=credits_pb2.CREDIT_GRANT_TYPE_PROMOTIONAL)

    grants = client.list_grants(account_id)
    assert isinstance(grants, list)
    assert [(g.type, g.amount, g.remaining, g.priority) for g in grants] == [
        (credits_pb2.CREDIT_GRANT_TYPE_PROMOTIONAL, "5", "5", 5),
        (credits_pb2.CREDIT_GRANT_TYPE_PROMOTIONAL, "7", "7", 20),
        (credits_pb2.CREDIT_GRANT_TYPE_PURCHASED, "10", "10", 30),
    ]
    assert to_dt(grants[0].expire_time) == expires
    assert not grants[1].HasField("expire_time")
    assert all(g.account_id == account_id and g.grant_id and g.entry_id for g in grants)

    client.debit(account_id, "6")  # all of the 5, then 1 of the 7
    remaining = [(g.amount, g.remaining) for g in client.list_grants(account_id)]
    assert remaining == [("7", "6"), ("10", "10")]
    spent = client.list_grants(account_id, include_spent=True)
    assert [(g.amount, g.remaining) for g in spent if g.remaining == "0"] == [("5", "0")]
    balance = client.get_balance(account_id)
    assert (balance.balance, balance.purchased_credits, balance.subscription_credits) == (
        "16",
        "16",
        "0",
    )
    assert_consistent(client, account_id)


def test_top_up_rejects_a_past_expiry(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    with pytest.raises(InvalidArgument):
        client.top_up(account_id, "1", expire_time=datetime.now(UTC) - timedelta(hours=1))
    assert client.list_grants(account_id) == []


def test_a_grant_expires(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    client.top_up(account_id, "10")
    client.top_up(
        account_id,
        "4",
        grant_type="promotional",
        expire_time=datetime.now(UTC) + timedelta(seconds=2),
    )
    assert client.get_balance(account_id).balance == "14"
    wait_for(
        lambda: [g.amount for g in client.list_grants(account_id)] == ["10"],
        "the promotional grant expires",
    )
    wait_for(
        lambda: client.get_balance(account_id).balance == "10", "the expired credit stops counting"
    )
    assert_consistent(client, account_id)


# --- auto-reload -----------------------------------------------------------------------


def test_set_auto_reload_and_list_reloads(client: TallyClient, funded: str) -> None:
    settings = client.set_auto_reload(
        funded,
        enabled=True,
        threshold="150",
        amount="25",
        max_reloads_per_day=3,
        max_amount_per_month="1000",
    )
    assert (
        settings.enabled,
        settings.threshold,
        settings.amount,
        settings.max_reloads_per_day,
        settings.max_amount_per_month,
        settings.disabled_reason,
    ) == (True, "150", "25", 3, "1000", "")
    # Available credit (100) is already below the threshold: a reload starts at once.
    wait_for(lambda: reloads_settled(client, funded, 1), "the reload is funded")
    (intent,) = client.list_reloads(funded).reloads
    assert (intent.status, intent.amount, intent.attempts, intent.error) == (
        credits_pb2.RELOAD_STATUS_SUCCEEDED,
        "25",
        1,
        "",
    )
    assert intent.account_id == funded and intent.entry_id and intent.charge_id
    assert intent.HasField("finish_time")
    # funding.proto: the credit's reference is the intent id; the charge id is in its metadata.
    credit = client.get_entry(intent.entry_id)
    assert credit.reference == intent.intent_id
    assert credit.metadata["charge_id"] == intent.charge_id
    assert [r.intent_id for r in client.iter_reloads(funded, page_size=1)] == [intent.intent_id]

    balance = client.get_balance(funded)
    assert balance.balance == "125"
    assert balance.auto_reload.enabled and balance.auto_reload.max_reloads_per_day == 3
    types = [g.type for g in client.list_grants(funded)]
    assert credits_pb2.CREDIT_GRANT_TYPE_AUTO_RELOAD in types

    off = client.set_auto_reload(funded, enabled=False)
    assert not off.enabled
    assert not client.get_balance(funded).auto_reload.enabled
    client.debit(funded, "10")  # no rule, no reload
    assert len(client.list_reloads(funded).reloads) == 1
    assert_consistent(client, funded)


def test_iter_reloads_pages(client: TallyClient, funded: str) -> None:
    client.set_auto_reload(funded, enabled=True, threshold="50", amount="5")
    for n in range(1, 4):
        # Each debit takes available from >= 50 to below it: one crossing each.
        available = int(client.get_balance(funded).available)
        client.debit(funded, str(available - 49))
        wait_for(partial(reloads_settled, client, funded, n), f"reload {n} is funded")
    first = client.list_reloads(funded, page_size=2)
    assert len(first.reloads) == 2 and first.next_page_token
    second = client.list_reloads(funded, page_size=2, page_token=first.next_page_token)
    assert len(second.reloads) == 1 and not second.next_page_token
    everything = list(client.iter_reloads(funded, page_size=2))
    assert [r.intent_id for r in everything] == [
        r.intent_id for r in [*first.reloads, *second.reloads]
    ]
    created = [to_dt(r.create_time) for r in everything]
    assert created == sorted(created, reverse=True)  # newest first


def test_set_auto_reload_zero_amount_is_invalid(client: TallyClient, funded: str) -> None:
    with pytest.raises(InvalidArgument):
        client.set_auto_reload(funded, enabled=True, threshold="10")


# --- subscriptions ---------------------------------------------------------------------


def test_set_and_cancel_subscription(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    sub = client.set_subscription(account_id, "pro", "100")
    assert (sub.plan, sub.status, sub.credits_per_period, sub.period, sub.rollover) == (
        "pro",
        accounts_pb2.SUBSCRIPTION_STATUS_ACTIVE,
        "100",
        accounts_pb2.SUBSCRIPTION_PERIOD_MONTHLY,
        False,
    )
    end = to_dt(sub.current_period_end_time)
    assert to_dt(sub.current_period_start_time) < end
    # The anchor is now, so the first period's grant is credited at once and
    # expires at the period end (no rollover).
    balance = client.get_balance(account_id)
    assert (balance.subscription_credits, balance.purchased_credits) == ("100", "0")
    (grant,) = client.list_grants(account_id)
    assert (grant.type, grant.amount, grant.priority) == (
        credits_pb2.CREDIT_GRANT_TYPE_SUBSCRIPTION,
        "100",
        10,
    )
    assert to_dt(grant.expire_time) == end
    summary = client.get_account_summary(account_id)
    assert summary.subscription.plan == "pro"

    anchor = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    changed = client.set_subscription(
        account_id, "team", "1200", period="yearly", anchor_time=anchor, rollover=True
    )
    assert (changed.plan, changed.period, changed.rollover, changed.credits_per_period) == (
        "team",
        accounts_pb2.SUBSCRIPTION_PERIOD_YEARLY,
        True,
        "1200",
    )
    assert to_dt(changed.anchor_time) == anchor

    cancelled = client.cancel_subscription(account_id)
    assert (cancelled.plan, cancelled.status) == ("", accounts_pb2.SUBSCRIPTION_STATUS_NONE)
    none = client.get_account_summary(account_id).subscription
    assert none.status == accounts_pb2.SUBSCRIPTION_STATUS_NONE
    assert_consistent(client, account_id)


def test_subscription_request_id_replays(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    key = f"sub-{uuid.uuid4().hex}"
    first = client.set_subscription(account_id, "pro", "50", request_id=key)
    again = client.set_subscription(account_id, "pro", "50", request_id=key)
    assert first == again
    assert client.get_balance(account_id).subscription_credits == "50"  # granted once


# --- async -----------------------------------------------------------------------------


def test_async_client(server: ServerProcess, account_id: str) -> None:
    async def run() -> None:
        async with AsyncTallyClient(server.target, timeout_seconds=10) as c:
            await c.create_account(account_id)
            await c.top_up(
                account_id,
                "3",
                grant_type="promotional",
                expire_time=datetime.now(UTC) + timedelta(days=1),
                priority=1,
            )
            sub = await c.set_subscription(account_id, "basic", "20", period="month")
            assert sub.status == accounts_pb2.SUBSCRIPTION_STATUS_ACTIVE
            grants = await c.list_grants(account_id)
            assert [(g.type, g.amount) for g in grants] == [
                (credits_pb2.CREDIT_GRANT_TYPE_PROMOTIONAL, "3"),
                (credits_pb2.CREDIT_GRANT_TYPE_SUBSCRIPTION, "20"),
            ]
            settings = await c.set_auto_reload(
                account_id, enabled=True, threshold="100", amount="10"
            )
            assert settings.enabled
            deadline = time.monotonic() + WAIT_SECONDS
            while True:
                page = await c.list_reloads(account_id)
                done = [r for r in page.reloads if r.status != credits_pb2.RELOAD_STATUS_PENDING]
                if page.reloads and len(done) == len(page.reloads):
                    break
                assert time.monotonic() < deadline, "the reload is not funded in time"
                await asyncio.sleep(0.1)
            intents = [r async for r in c.iter_reloads(account_id)]
            assert [(r.status, r.amount) for r in intents] == [
                (credits_pb2.RELOAD_STATUS_SUCCEEDED, "10")
            ]
            assert (await c.get_balance(account_id)).balance == "33"
            await c.set_auto_reload(account_id, enabled=False)
            cancelled = await c.cancel_subscription(account_id)
            assert cancelled.plan == ""
            assert (await c.verify_account(account_id)).consistent

    asyncio.run(run())


# --- tallyctl --------------------------------------------------------------------------


def test_tallyctl_grants_and_balance(
    server: ServerProcess, account_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--target", server.target]
    assert tallyctl([*base, "accounts", "create", account_id]) == 0
    assert tallyctl([*base, "topup", account_id, "10"]) == 0
    expires = "2099-01-31T00:00:00Z"
    args = ["--grant-type", "promotional", "--expires", expires, "--priority", "7"]
    assert tallyctl([*base, "topup", account_id, "2.5", *args]) == 0
    assert tallyctl([*base, "debit", account_id, "2.5"]) == 0
    capsys.readouterr()

    assert tallyctl([*base, "grants", account_id]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TYPE", "AMOUNT", "REMAINING", "PRIORITY", "EXPIRES", "CREATED"]
    assert len(lines) == 3  # the promotional grant is spent
    assert lines[2].split()[:5] == ["purchased", "10", "10", "30", "-"]

    assert tallyctl([*base, "grants", account_id, "--all"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[:5] for r in rows] == [
        ["promotional", "2.5", "0", "7", expires],
        ["purchased", "10", "10", "30", "-"],
    ]

    assert tallyctl([*base, "subscribe", account_id, "pro", "40"]) == 0
    capsys.readouterr()
    assert tallyctl([*base, "balance", account_id]) == 0
    fields = fields_of(capsys.readouterr().out)
    assert fields["balance"] == "50"
    assert fields["subscription_credits"] == "40"
    assert fields["purchased_credits"] == "10"
    assert fields["auto_reload"] == "off"
    assert fields["auto_reload_max_per_day"] == "no limit"
    assert fields["auto_reload_max_per_month"] == "no limit"
    assert fields["auto_reload_disabled_reason"] == "-"


def test_tallyctl_usage_errors(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--target", server.target]
    with pytest.raises(SystemExit) as bad_type:
        tallyctl([*base, "topup", "x", "1", "--grant-type", "gift"])
    assert bad_type.value.code == 2
    assert "gift" in capsys.readouterr().err
    with pytest.raises(SystemExit) as no_amount:
        tallyctl([*base, "auto-reload", "x", "--threshold", "5"])
    assert no_amount.value.code == 2
    assert "--amount" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_period:
        tallyctl([*base, "subscribe", "x", "pro", "10", "--period", "weekly"])
    assert bad_period.value.code == 2


def test_tallyctl_auto_reload_and_reloads(
    server: ServerProcess, client: TallyClient, funded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--target", server.target]
    capsys.readouterr()
    args = ["--threshold", "120", "--amount", "30", "--max-per-day", "2", "--max-per-month", "90"]
    assert tallyctl([*base, "auto-reload", funded, *args]) == 0
    fields = fields_of(capsys.readouterr().out)
    assert fields["auto_reload"] == "on: add 30 below 120"
    assert fields["auto_reload_max_per_day"] == "2"
    assert fields["auto_reload_max_per_month"] == "90"
    wait_for(lambda: reloads_settled(client, funded, 1), "the reload is funded")

    assert tallyctl([*base, "reloads", funded]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "INTENT_ID",
        "STATUS",
        "AMOUNT",
        "ATTEMPTS",
        "ERROR",
        "CREATED",
        "FINISHED",
    ]
    (intent,) = client.list_reloads(funded).reloads
    row = lines[2].split()
    assert row[:4] == [intent.intent_id, "succeeded", "30", "1"]
    assert row[-1].endswith("Z")  # finished

    assert tallyctl([*base, "balance", funded]) == 0
    fields = fields_of(capsys.readouterr().out)
    assert (fields["balance"], fields["auto_reload"]) == ("130", "on: add 30 below 120")

    assert tallyctl([*base, "auto-reload", funded, "--disable"]) == 0
    assert fields_of(capsys.readouterr().out)["auto_reload"] == "off"
    assert not client.get_balance(funded).auto_reload.enabled

    assert tallyctl([*base, "auto-reload", funded, "--threshold", "1", "--amount", "0"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_tallyctl_subscribe_and_unsubscribe(
    server: ServerProcess, client: TallyClient, account_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--target", server.target]
    client.create_account(account_id)
    anchor = (datetime.now(UTC) + timedelta(days=10)).replace(microsecond=0)
    anchor_text = anchor.isoformat().replace("+00:00", "Z")
    args = ["--period", "yearly", "--anchor", anchor_text, "--rollover"]
    assert tallyctl([*base, "subscribe", account_id, "team", "500", *args]) == 0
    fields = fields_of(capsys.readouterr().out)
    assert fields["plan"] == "team"
    assert fields["status"] == "active"
    assert fields["credits_per_period"] == "500"
    assert fields["period"] == "yearly"
    assert fields["rollover"] == "yes"
    assert fields["anchor_time"] == anchor_text
    # The anchor is in the future: nothing is granted yet.
    assert client.get_balance(account_id).subscription_credits == "0"

    assert tallyctl([*base, "unsubscribe", account_id]) == 0
    fields = fields_of(capsys.readouterr().out)
    assert (fields["plan"], fields["status"]) == ("-", "none")

    assert tallyctl([*base, "subscribe", "no-such-account-x", "pro", "1"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
