"""Credit grants: burn order, expiry at the instant, debt, and the balance split."""

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tally.v1 import credits_pb2 as c
from tally.v1 import ledger_pb2
from tally_client import InvalidArgument, TallyClient, error_from_rpc
from tests.support import assert_consistent


def ts(t: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def grant(client: TallyClient, account_id: str, amount: str, **fields: Any) -> None:
    request = c.TopUpRequest(
        request_id=str(uuid.uuid4()), account_id=account_id, amount=amount, **fields
    )
    try:
        client.stubs.credits.TopUp(request, timeout=10)
    except grpc.RpcError as e:
        raise error_from_rpc(e) from None


def grants(
    client: TallyClient, account_id: str, include_spent: bool = False
) -> list[c.CreditGrant]:
    return list(
        client.stubs.credits.ListGrants(
            c.ListGrantsRequest(account_id=account_id, include_spent=include_spent), timeout=10
        ).grants
    )


def test_burn_order_priority_then_expiry_then_age(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    soon, later = datetime.now(UTC) + timedelta(days=2), datetime.now(UTC) + timedelta(days=9)
    grant(client, account_id, "10")  # purchased, priority 30, never expires (oldest)
    grant(
        client, account_id, "5", grant_type=c.CREDIT_GRANT_TYPE_PROMOTIONAL, expire_time=ts(later)
    )  # priority 20
    grant(
        client, account_id, "4", grant_type=c.CREDIT_GRANT_TYPE_PROMOTIONAL, expire_time=ts(soon)
    )  # priority 20, expires first
    grant(client, account_id, "3", priority=5)  # purchased, but drawn first
    order = [(g.amount, g.priority) for g in grants(client, account_id)]
    assert order == [("3", 5), ("4", 20), ("5", 20), ("10", 30)]
    client.debit(account_id, "8.5")  # 3 + 4 + 1.5 of the 5
    assert [(g.amount, g.remaining) for g in grants(client, account_id)] == [
        ("5", "3.5"),
        ("10", "10"),
    ]
    assert len(grants(client, account_id, include_spent=True)) == 4
    balance = client.get_balance(account_id)
    assert (balance.balance, balance.purchased_credits, balance.subscription_credits) == (
        "13.5",
        "13.5",
        "0",
    )
    assert_consistent(client, account_id)


def test_debt_is_repaid_before_a_grant_counts(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id, overdraft_limit="10")
    client.debit(account_id, "4")
    grant(client, account_id, "6")
    (only,) = grants(client, account_id)
    assert (only.amount, only.remaining) == ("6", "2")
    client.adjust(account_id, "-3", "correction")  # takes the balance to -1 again
    assert grants(client, account_id) == []
    client.adjust(account_id, "1.5", "goodwill")
    (promo,) = grants(client, account_id)
    assert (promo.type, promo.remaining) == (c.CREDIT_GRANT_TYPE_PROMOTIONAL, "0.5")
    assert_consistent(client, account_id)


def test_expired_grant_stops_counting_at_the_instant(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    grant(client, account_id, "10")
    expires = datetime.now(UTC) + timedelta(seconds=1)
    grant(
        client, account_id, "7", grant_type=c.CREDIT_GRANT_TYPE_PROMOTIONAL, expire_time=ts(expires)
    )
    client.debit(account_id, "2")  # drawn from the promotional grant first
    assert client.get_balance(account_id).balance == "15"
    time.sleep(1.3)
    assert client.get_balance(account_id).balance == "10"
    expired = client.list_entries(account_id, type="debit").entries[0]
    assert (expired.amount, expired.description) == ("-5", "expired")
    assert expired.create_time.ToDatetime(tzinfo=UTC) == expires.replace(
        microsecond=expires.microsecond
    )
    assert [g.remaining for g in grants(client, account_id)] == ["10"]
    assert_consistent(client, account_id)


def test_top_up_grant_validation(client: TallyClient, funded: str) -> None:
    with pytest.raises(InvalidArgument) as past:
        grant(client, funded, "1", expire_time=ts(datetime.now(UTC) - timedelta(seconds=1)))
    assert past.value.field_violations[0][0] == "expire_time"
    with pytest.raises(InvalidArgument) as priority:
        grant(client, funded, "1", priority=1001)
    assert priority.value.field_violations[0][0] == "priority"
    with pytest.raises(InvalidArgument):
        grant(client, funded, "1", grant_type=99)


def test_usage_records_which_credits_paid(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    client.upsert_product(f"p-{account_id}", "1")
    grant(client, account_id, "1", grant_type=c.CREDIT_GRANT_TYPE_SUBSCRIPTION)
    grant(client, account_id, "5")
    first = client.record_usage(account_id, "e1", f"p-{account_id}")
    second = client.record_usage(account_id, "e2", f"p-{account_id}")
    from tally.v1 import metering_pb2 as m

    assert first.event.credit_type == m.CREDIT_TYPE_SUBSCRIPTION
    assert second.event.credit_type == m.CREDIT_TYPE_PURCHASED
    entry = client.get_entry(first.entry.entry_id)
    assert entry.type == ledger_pb2.ENTRY_TYPE_DEBIT
    assert_consistent(client, account_id)


def test_list_grants_pages_in_draw_order(client: TallyClient, account_id: str) -> None:
    """Grants page by a keyset in draw order (none expiring sort last within a priority);
    the pages together are the whole list, and a token is bound to its filters."""
    client.create_account(account_id)
    soon = datetime.now(UTC) + timedelta(days=2)
    for i in range(7):
        expiry = {"expire_time": ts(soon + timedelta(hours=i % 3))} if i % 2 else {}
        grant(client, account_id, str(i + 1), priority=(i % 3) * 10, **expiry)
    everything = grants(client, account_id)
    assert len(everything) == 7
    seen: list[c.CreditGrant] = []
    token = ""
    while True:
        page = client.stubs.credits.ListGrants(
            c.ListGrantsRequest(account_id=account_id, page_size=2, page_token=token), timeout=10
        )
        assert len(page.grants) <= 2
        seen.extend(page.grants)
        token = page.next_page_token
        if not token:
            break
        with pytest.raises(InvalidArgument) as caught:
            try:
                client.stubs.credits.ListGrants(
                    c.ListGrantsRequest(
                        account_id=account_id, include_spent=True, page_token=token
                    ),
                    timeout=10,
                )
            except grpc.RpcError as e:
                raise error_from_rpc(e) from None
        assert caught.value.field_violations[0][0] == "page_token"
    assert [g.grant_id for g in seen] == [g.grant_id for g in everything]
    assert [g.grant_id for g in client.list_grants(account_id)] == [g.grant_id for g in everything]
    assert len(list(client.iter_grants(account_id, page_size=3))) == 7


def test_list_grants_is_not_capped(client: TallyClient, account_id: str) -> None:
    """More grants than a page (and than the old silent cap of the page size) all list."""
    client.create_account(account_id)
    for _ in range(105):
        grant(client, account_id, "1")
    assert len(grants(client, account_id)) == 50
    assert len(client.list_grants(account_id)) == 105
