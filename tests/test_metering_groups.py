"""Set-based recording: one call of tally_record_usage applies a whole group (a batch of
up to 1,000 events, a stream's group) with the same per-event outcomes as recording the
events one by one, in order."""

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from tally.v1 import credits_pb2 as c
from tally.v1 import metering_pb2 as m
from tally.v1 import metering_pb2_grpc
from tally_client import InsufficientCredits, TallyClient, error_from_status
from tests.conftest import ServerProcess
from tests.support import assert_consistent
from tests.test_metering import call, event, product, struct
from tests.test_metering_races import fire

OK, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION = 0, 5, 6, 9


@pytest.fixture(scope="module")
def metering(client: TallyClient) -> metering_pb2_grpc.MeteringServiceStub:
    return metering_pb2_grpc.MeteringServiceStub(client.channel)


def batch(metering: metering_pb2_grpc.MeteringServiceStub, events: list[m.UsageEvent]) -> Any:
    return call(metering.RecordUsageBatch, m.RecordUsageBatchRequest(events=events)).results


def new_account(client: TallyClient, top_up: str = "", overdraft: str = "") -> str:
    account = f"grp-{uuid.uuid4().hex[:12]}"
    client.create_account(account, overdraft_limit=overdraft or None)
    if top_up:
        client.top_up(account, top_up)
    return account


def entries(client: TallyClient, account: str) -> list[Any]:
    out: list[Any] = []
    token = ""
    while True:
        page = client.list_entries(account, page_size=100, page_token=token)
        out.extend(page.entries)
        token = page.next_page_token
        if not token:
            return out


def test_a_thousand_events_over_accounts_with_duplicates_and_refusals(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub
) -> None:
    price = product(metering, "0.5")
    rich = [new_account(client, "1000") for _ in range(3)]
    poor = new_account(client, "2")  # room for 4 events
    known = event(rich[0], price, event_id="known")
    batch(metering, [known])  # recorded before the big batch
    events: list[m.UsageEvent] = []
    for i in range(990):
        events.append(event(rich[i % 3], price, event_id=f"e{i}", endpoint=f"/p{i % 4}"))
    events[10] = event(rich[1], price, event_id="e7", endpoint="/p3")  # e7 of rich[1]: same
    events[11] = event(rich[1], price, event_id="e7", quantity=2)  # another payload
    events.append(known)  # 990: recorded before, same payload
    changed = m.UsageEvent()
    changed.CopyFrom(known)
    changed.quantity = 3
    events.append(changed)  # 991: recorded before, another payload
    events.append(event("no-such-account", price))  # 992
    events.append(event(rich[2], "no-such-product"))  # 993
    events.append(event(poor, price, event_id="p0", quantity=3))  # 994: 1.5 of 2
    events.append(event(poor, price, event_id="p1", quantity=2))  # 995: 1 > 0.5 left: refused
    events.append(event(poor, price, event_id="p2", quantity=1))  # 996: 0.5 fits
    events.append(event(poor, price, event_id="p3", quantity=1))  # 997: nothing left
    events.append(event(poor, price, event_id="p4", credits="0"))  # 998: free, always fits
    events.append(event(poor, price, event_id="p2", quantity=1))  # 999: duplicate of 996
    assert len(events) == 1000

    results = batch(metering, events)
    assert [r.index for r in results] == list(range(1000))
    codes = {i: r.status.code for i, r in enumerate(results) if r.status.code}
    assert codes == {
        11: ALREADY_EXISTS,
        991: ALREADY_EXISTS,
        992: NOT_FOUND,
        993: NOT_FOUND,
        995: FAILED_PRECONDITION,
        997: FAILED_PRECONDITION,
    }
    # A refused event's result is its status alone (no response begun for it remains).
    assert not any(results[i].HasField("result") for i in codes)
    assert all(results[i].HasField("result") for i in range(1000) if i not in codes)
    assert results[10].result.duplicate and results[10].result.event == results[7].result.event
    assert results[10].result.entry == results[7].result.entry
    assert results[990].result.duplicate
    assert results[999].result.duplicate and results[999].result.event == results[996].result.event
    assert not any(results[i].result.duplicate for i in range(990) if i not in (10, 11))
    refused = error_from_status(results[995].status)
    assert isinstance(refused, InsufficientCredits)
    assert (refused.metadata["available"], refused.metadata["requested"]) == ("0.5", "1")

    # The poor account: the rule in order, a later smaller event still fits.
    assert client.get_balance(poor).balance == "0"
    poor_entries = [e for e in entries(client, poor) if e.type == 2]  # debits
    assert sorted(e.reference for e in poor_entries) == ["p0", "p2"]
    # Each rich account: one debit per charged event, chained, summing to the charges.
    for account in rich:
        recorded = [
            r.result
            for r in results
            if r.result.event.account_id == account and not r.result.duplicate
        ]
        charged = sum(Decimal(r.event.credits) for r in recorded)
        start = Decimal(1000) - (Decimal("0.5") if account == rich[0] else 0)
        assert Decimal(client.get_balance(account).balance) == start - charged
        debits = [e for e in entries(client, account) if e.type == 2]
        assert len(debits) == len(recorded) + (account == rich[0])
        assert {r.entry.entry_id for r in recorded} <= {e.entry_id for e in debits}
        sequences = sorted(r.entry.sequence for r in recorded)
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
        assert_consistent(client, account)
    assert_consistent(client, poor)

    # Statistics agree with the events (rollups written once per group).
    usage = call(metering.GetUsage, m.GetUsageRequest(account_id=rich[2]))
    assert usage.totals.total_requests == sum(
        1 for r in results if r.result.event.account_id == rich[2] and not r.result.duplicate
    )

    # The whole batch again: every recorded event is a duplicate with the same result.
    again = batch(metering, events)
    for first, second in zip(results, again, strict=True):
        if first.status.code == OK:
            assert second.result.duplicate
            assert second.result.event == first.result.event
            assert second.result.entry == first.result.entry
    assert client.get_balance(poor).balance == "0"


def test_a_refused_occurrence_does_not_claim_its_event_id(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub
) -> None:
    price = product(metering, "1")
    account = new_account(client, "2")
    results = batch(
        metering,
        [
            event(account, price, event_id="x", quantity=5),  # refused: no credit
            event(account, "no-such-product", event_id="x"),  # refused: no product
            event(account, price, event_id="x", quantity=1),  # another payload: recorded
            event(account, price, event_id="x", quantity=1),  # its duplicate
            event(account, price, event_id="x", quantity=2),  # reuses it
        ],
    )
    assert [r.status.code for r in results] == [
        FAILED_PRECONDITION,
        NOT_FOUND,
        OK,
        OK,
        ALREADY_EXISTS,
    ]
    assert not results[2].result.duplicate and results[3].result.duplicate
    assert client.get_balance(account).balance == "1"
    assert_consistent(client, account)


def test_first_answer_equals_its_replay(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub
) -> None:
    price = product(metering, "0.25", charge_failed=True)
    account = new_account(client, "10")
    events = [
        event(
            account,
            price,
            endpoint="/v1/x",
            request_metadata=struct({"a": [1, "two", None, {"b": True}], "n": 1.5}),
            result_metadata=struct({"ok": False}),
            status_code=201,
            message="done",
            webhook_url="https://hooks.example/x",
            processing_time_ms=12,
        ),
        event(account, price, status=m.USAGE_STATUS_FAILED, quantity=4),
        event(account, price, credits="0"),
    ]
    first = batch(metering, events)
    replay = batch(metering, events)
    for a, b in zip(first, replay, strict=True):
        assert not a.result.duplicate and b.result.duplicate
        assert a.result.event == b.result.event
        assert a.result.entry == b.result.entry
    assert first[1].result.event.credits == "1"
    assert first[2].result.event.entry_id == 0 and not first[2].result.HasField("entry")


def test_credit_types_across_grants_in_one_group(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub
) -> None:
    price = product(metering, "1")
    account = new_account(client)
    client.top_up(account, "1.5", grant_type=c.CREDIT_GRANT_TYPE_SUBSCRIPTION)
    client.top_up(account, "5")
    results = batch(metering, [event(account, price) for _ in range(4)])
    assert [r.result.event.credit_type for r in results] == [
        m.CREDIT_TYPE_SUBSCRIPTION,
        m.CREDIT_TYPE_SUBSCRIPTION,  # starts in the subscription grant, ends in the other
        m.CREDIT_TYPE_PURCHASED,
        m.CREDIT_TYPE_PURCHASED,
    ]
    assert client.get_balance(account).balance == "2.5"
    assert_consistent(client, account)


def test_stream_messages_carry_several_events(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub
) -> None:
    price = product(metering, "0.01")
    account = new_account(client, "100")
    events = [event(account, price) for _ in range(2500)]
    events.insert(1234, event(account, "no-such-product"))

    def messages() -> Iterator[m.StreamUsageRequest]:
        yield m.StreamUsageRequest(event=events[0])  # the single-event form
        yield m.StreamUsageRequest(event=events[1], events=events[2:700])  # both
        for first in range(700, len(events), 300):
            yield m.StreamUsageRequest(events=events[first : first + 300])

    response = call(metering.StreamUsage, messages())
    assert (response.recorded, response.duplicates, response.failed) == (2500, 0, 1)
    assert response.failures[0].index == 1234
    assert client.get_balance(account).balance == "75"
    replay = client.stream_usage(events)  # the client sends 100 events a message
    assert (replay.recorded, replay.duplicates, replay.failed) == (0, 2500, 1)
    assert replay.failures[0].index == 1234
    assert_consistent(client, account)

    too_many = [m.StreamUsageRequest(events=[event(account, price) for _ in range(1001)])]
    with pytest.raises(Exception) as info:
        call(metering.StreamUsage, iter(too_many))
    assert info.value.field_violations[0][0] == "events"  # type: ignore[attr-defined]


def test_concurrent_groups_over_the_same_accounts(
    client: TallyClient, server: ServerProcess, second_server: ServerProcess
) -> None:
    """Batches over the same accounts, in opposite orders and with overlapping event ids,
    on two replicas at once: no deadlock, no error, every event charged exactly once."""
    stub = metering_pb2_grpc.MeteringServiceStub(client.channel)
    price = product(stub, "1")
    accounts = [new_account(client, "1000") for _ in range(4)]
    calls: list[tuple[str, Any]] = []
    for k in range(8):
        order = accounts if k % 2 == 0 else accounts[::-1]
        events = [
            event(account, price, event_id=f"shared-{i % 30}")
            for i, account in enumerate(order * 30)
        ]
        calls.append(("RecordUsageBatch", m.RecordUsageBatchRequest(events=events)))
    replies = fire((server, second_server), calls)
    assert all(isinstance(r, m.RecordUsageBatchResponse) for r in replies), replies
    recorded = sum(
        1 for r in replies for x in r.results if x.status.code == OK and not x.result.duplicate
    )
    keys = {(e.account_id, e.event_id) for _, rq in calls for e in rq.events}
    assert recorded == len(keys)
    for account in accounts:
        mine = {k for k in keys if k[0] == account}
        assert client.get_balance(account).balance == str(1000 - len(mine))
        assert_consistent(client, account)
