"""Subscriptions: period arithmetic in the account's zone, renewal, expiry, rollover."""

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tally.v1 import accounts_pb2 as a
from tally.v1 import credits_pb2 as c
from tally_client import TallyClient
from tests.support import assert_consistent, query


def ts(t: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def subscribe(client: TallyClient, account_id: str, **fields: Any) -> a.Subscription:
    fields.setdefault("period", a.SUBSCRIPTION_PERIOD_MONTHLY)
    response = client.stubs.accounts.SetSubscription(
        a.SetSubscriptionRequest(
            request_id=str(uuid.uuid4()),
            account_id=account_id,
            subscription=a.Subscription(**fields),
        ),
        timeout=10,
    )
    subscription: a.Subscription = response.subscription
    return subscription


def test_month_ends_in_kolkata_do_not_drift(
    client: TallyClient, account_id: str, database_url: str
) -> None:
    kolkata = ZoneInfo("Asia/Kolkata")
    client.create_account(account_id, time_zone="Asia/Kolkata")
    year = datetime.now(kolkata).year + 1
    anchor = datetime(year, 1, 31, tzinfo=kolkata)  # within a year ahead
    sub = subscribe(
        client, account_id, plan="pro", credits_per_period="100", anchor_time=ts(anchor)
    )
    assert sub.status == a.SUBSCRIPTION_STATUS_ACTIVE
    assert sub.current_period_end_time.ToDatetime(tzinfo=UTC) == anchor  # nothing granted yet
    rows = query(
        database_url,
        "SELECT n, tally_period_start(s, n, 'Asia/Kolkata') FROM subscriptions s, "
        "generate_series(0, 3) n WHERE account_id = :a ORDER BY n",
        a=account_id,
    )
    starts = [r[1].astimezone(kolkata) for r in rows]
    assert [(d.month, d.day, d.hour) for d in starts] == [
        (1, 31, 0),
        (2, 28, 0),
        (3, 31, 0),
        (4, 30, 0),
    ]
    assert client.get_balance(account_id).subscription_credits == "0"


def test_los_angeles_periods_keep_local_midnight_across_dst(
    client: TallyClient, account_id: str, database_url: str
) -> None:
    la = ZoneInfo("America/Los_Angeles")
    client.create_account(account_id, time_zone="America/Los_Angeles")
    anchor = datetime(datetime.now(la).year + 1, 3, 1, tzinfo=la)
    if anchor - datetime.now(UTC) > timedelta(days=365):
        anchor = anchor.replace(year=anchor.year - 1)
    subscribe(client, account_id, plan="pro", credits_per_period="1", anchor_time=ts(anchor))
    rows = query(
        database_url,
        "SELECT tally_period_start(s, 1, 'America/Los_Angeles') FROM subscriptions s "
        "WHERE account_id = :a",
        a=account_id,
    )
    april = rows[0][0]
    assert april == datetime(anchor.year, 4, 1, tzinfo=la)
    assert april.astimezone(UTC).hour == 7  # PDT, not PST


def test_renewal_expires_the_old_period_and_grants_the_new(
    client: TallyClient, account_id: str, database_url: str
) -> None:
    client.create_account(account_id, time_zone="Asia/Kolkata")
    client.top_up(account_id, "10")
    # A period that began a month ago (local time) and ends 3 seconds from now.
    ((anchor,),) = query(
        database_url,
        "SELECT ((clock_timestamp() AT TIME ZONE 'Asia/Kolkata') "
        "- interval '1 month' + interval '3 seconds') AT TIME ZONE 'Asia/Kolkata'",
    )
    sub = subscribe(
        client, account_id, plan="starter", credits_per_period="100", anchor_time=ts(anchor)
    )
    period_end = sub.current_period_end_time.ToDatetime(tzinfo=UTC)
    assert sub.plan == "starter" and sub.current_period_start_time.ToDatetime(tzinfo=UTC) == anchor
    balance = client.get_balance(account_id)
    assert (balance.subscription_credits, balance.purchased_credits) == ("100", "10")
    client.debit(account_id, "30")  # subscription credit is drawn first
    assert client.get_balance(account_id).subscription_credits == "70"
    time.sleep(max(0.0, (period_end - datetime.now(UTC)).total_seconds()) + 0.5)
    balance = client.get_balance(account_id)
    assert (balance.subscription_credits, balance.purchased_credits, balance.balance) == (
        "100",
        "10",
        "110",
    )
    entries = client.list_entries(account_id).entries
    renewal, expiry = entries[0], entries[1]
    assert (expiry.amount, expiry.description) == ("-70", "expired")
    assert (renewal.amount, renewal.description) == ("100", "subscription starter")
    assert expiry.create_time.ToDatetime(tzinfo=UTC) == period_end
    assert renewal.create_time.ToDatetime(tzinfo=UTC) == period_end
    summary = client.get_account_summary(account_id).subscription
    assert summary.status == a.SUBSCRIPTION_STATUS_ACTIVE
    assert summary.current_period_start_time.ToDatetime(tzinfo=UTC) == period_end
    assert_consistent(client, account_id)


def test_rollover_and_cancel(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    subscribe(
        client,
        account_id,
        plan="keep",
        credits_per_period="5",
        rollover=True,
        period=a.SUBSCRIPTION_PERIOD_YEARLY,
    )
    (only,) = client.stubs.credits.ListGrants(
        c.ListGrantsRequest(account_id=account_id), timeout=10
    ).grants
    assert only.type == c.CREDIT_GRANT_TYPE_SUBSCRIPTION and not only.HasField("expire_time")
    cancelled = subscribe(client, account_id, plan="", credits_per_period="")
    assert cancelled.status == a.SUBSCRIPTION_STATUS_NONE
    assert client.get_account_summary(account_id).subscription.status == (
        a.SUBSCRIPTION_STATUS_NONE
    )
    assert client.get_balance(account_id).subscription_credits == "5"  # granted credit stays
    assert_consistent(client, account_id)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"plan": "p", "credits_per_period": "0"}, "subscription.credits_per_period"),
        ({"plan": "p", "credits_per_period": "1", "period": 0}, "subscription.period"),
        ({"plan": "x" * 65, "credits_per_period": "1"}, "subscription.plan"),
    ],
)
def test_subscription_validation(
    client: TallyClient, funded: str, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        subscribe(client, funded, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
