"""Get for every resource that has a List (AIP-131), and ListReservations (AIP-158),
through the client against a real server."""

import asyncio
import time
import uuid

import pytest

from tally.v1 import credits_pb2, metering_pb2
from tally_client import (
    AsyncTallyClient,
    EventNotFound,
    GrantNotFound,
    InvalidArgument,
    ProductNotFound,
    ReloadNotFound,
    TallyClient,
)
from tests.conftest import ServerProcess


def test_get_grant(client: TallyClient, funded: str) -> None:
    grant = client.list_grants(funded)[0]
    assert client.get_grant(grant.grant_id) == grant
    assert client.get_grant(grant.grant_id.upper()).grant_id == grant.grant_id
    missing = str(uuid.uuid4())
    with pytest.raises(GrantNotFound) as info:
        client.get_grant(missing)
    assert info.value.metadata == {"resource": "grant", "id": missing}
    with pytest.raises(InvalidArgument, match="grant_id"):
        client.get_grant("not-a-uuid")


def test_get_reload(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    client.set_auto_reload(account_id, enabled=True, threshold="10", amount="25")
    deadline = time.monotonic() + 20
    while not (intents := client.list_reloads(account_id).reloads):
        assert time.monotonic() < deadline, "no reload intent within 20s"
        time.sleep(0.1)
    got = client.get_reload(intents[0].intent_id)
    assert got.intent_id == intents[0].intent_id
    assert got.account_id == account_id
    assert got.amount == "25"
    with pytest.raises(ReloadNotFound):
        client.get_reload(str(uuid.uuid4()))


def test_get_product(client: TallyClient) -> None:
    product_id = f"prod-{uuid.uuid4().hex[:12]}"
    stored = client.upsert_product(product_id, "2.95", display_name="PAN Plus")
    assert client.get_product(product_id) == stored
    with pytest.raises(ProductNotFound) as info:
        client.get_product(product_id + "-missing")
    assert info.value.reason == "PRODUCT_NOT_FOUND"


def test_get_usage_event(client: TallyClient, funded: str) -> None:
    product_id = f"prod-{uuid.uuid4().hex[:12]}"
    client.upsert_product(product_id, "1.5")
    recorded = client.record_usage(funded, "txn-1", product_id, quantity=2)
    event = client.get_usage_event(funded, "txn-1")
    assert event == recorded.event
    assert event.credits == "3"
    with pytest.raises(EventNotFound):
        client.get_usage_event(funded, "txn-2")


def test_list_reservations_pages_and_filters(client: TallyClient, funded: str) -> None:
    holds = [client.reserve(funded, "1", ttl_seconds=600) for _ in range(5)]
    client.release(holds[1].reservation_id)
    client.capture(holds[3].reservation_id, amount="0.5")
    newest_first = [h.reservation_id for h in reversed(holds)]

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = client.list_reservations(funded, page_size=2, page_token=token)
        assert len(page.reservations) <= 2
        seen += [r.reservation_id for r in page.reservations]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == newest_first
    assert pages == 3
    assert [r.reservation_id for r in client.iter_reservations(funded, page_size=3)] == seen

    pending = client.list_reservations(funded, status="pending").reservations
    assert [r.reservation_id for r in pending] == [holds[i].reservation_id for i in (4, 2, 0)]
    captured = client.list_reservations(
        funded, status=credits_pb2.RESERVATION_STATUS_CAPTURED
    ).reservations
    assert [(r.reservation_id, r.captured_amount) for r in captured] == [
        (holds[3].reservation_id, "0.5")
    ]

    # A token is bound to its filters.
    first = client.list_reservations(funded, page_size=1)
    with pytest.raises(InvalidArgument, match="page_token"):
        client.list_reservations(funded, status="pending", page_token=first.next_page_token)


def test_list_reservations_shows_expiry_and_unknown_account(
    client: TallyClient, funded: str
) -> None:
    hold = client.reserve(funded, "1", ttl_seconds=1)
    time.sleep(1.5)
    expired = client.list_reservations(funded, status="expired").reservations
    assert [r.reservation_id for r in expired] == [hold.reservation_id]
    assert client.list_reservations(funded, status="pending").reservations == []
    with pytest.raises(Exception, match="ACCOUNT_NOT_FOUND"):
        client.list_reservations(f"missing-{uuid.uuid4().hex[:8]}")


def test_async_client_reads(server: ServerProcess, funded: str) -> None:
    async def main() -> None:
        async with AsyncTallyClient(server.target, timeout_seconds=10) as c:
            grant = (await c.list_grants(funded))[0]
            assert (await c.get_grant(grant.grant_id)).remaining == "100"
            hold = await c.reserve(funded, "2")
            page = await c.list_reservations(funded, status="pending")
            assert [r.reservation_id for r in page.reservations] == [hold.reservation_id]
            with pytest.raises(ProductNotFound):
                await c.get_product(f"missing-{uuid.uuid4().hex[:8]}")

    asyncio.run(main())


def test_reads_are_distinct_methods() -> None:
    names = {m.name for m in credits_pb2.DESCRIPTOR.services_by_name["CreditsService"].methods}
    assert {"GetGrant", "GetReload", "ListReservations"} <= names
    names = {m.name for m in metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].methods}
    assert {"GetProduct", "GetUsageEvent"} <= names
