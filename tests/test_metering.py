"""MeteringService against a real server: recording, pricing, long jobs, statistics."""

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from tally.v1 import metering_pb2 as m
from tally.v1 import metering_pb2_grpc
from tally_client import InvalidArgument, TallyClient, error_from_rpc
from tests.support import assert_consistent


@pytest.fixture(scope="module")
def metering(client: TallyClient) -> metering_pb2_grpc.MeteringServiceStub:
    return metering_pb2_grpc.MeteringServiceStub(client.channel)


def call(method: Any, request: Any) -> Any:
    """Calls a stub method; raises the client library's typed error on failure."""
    try:
        return method(request, timeout=30)
    except grpc.RpcError as e:
        raise error_from_rpc(e) from None


def ts(t: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def product(
    metering: metering_pb2_grpc.MeteringServiceStub,
    price: str = "2.95",
    *,
    charge_failed: bool = False,
    minimum: str = "",
) -> str:
    product_id = f"prod-{uuid.uuid4().hex[:10]}"
    call(
        metering.UpsertProduct,
        m.UpsertProductRequest(
            request_id=str(uuid.uuid4()),
            product=m.Product(
                product_id=product_id,
                credits_per_unit=price,
                charge_failed=charge_failed,
                minimum_charge=minimum,
            ),
        ),
    )
    return product_id


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def event(account: str, product_id: str, **fields: Any) -> m.UsageEvent:
    fields.setdefault("event_id", str(uuid.uuid4()))
    return m.UsageEvent(account_id=account, product_id=product_id, **fields)


def record(metering: metering_pb2_grpc.MeteringServiceStub, e: m.UsageEvent) -> Any:
    return call(metering.RecordUsage, m.RecordUsageRequest(event=e))


def test_catalog(metering: metering_pb2_grpc.MeteringServiceStub) -> None:
    key = str(uuid.uuid4())
    request = m.UpsertProductRequest(
        request_id=key,
        product=m.Product(product_id=f"cat-{key[:8]}", credits_per_unit="0.5", charge_failed=True),
    )
    first = call(metering.UpsertProduct, request).product
    assert (first.credits_per_unit, first.charge_failed, first.minimum_charge) == ("0.5", True, "0")
    assert call(metering.UpsertProduct, request).product == first
    listed = call(metering.ListProducts, m.ListProductsRequest(page_size=100))
    assert first.product_id in [p.product_id for p in listed.products]
    for bad in ("-1", "0.0000001", "x"):
        with pytest.raises(Exception) as info:
            call(
                metering.UpsertProduct,
                m.UpsertProductRequest(
                    request_id=str(uuid.uuid4()),
                    product=m.Product(product_id="p", credits_per_unit=bad),
                ),
            )
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_record_charges_the_catalog_price(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    pan = product(metering, "2.95", charge_failed=True)
    ok = record(
        metering,
        event(
            funded,
            pan,
            endpoint="/v1/pan",
            status_code=200,
            message="Pan Verified Successfully.",
            request_metadata={"pan": "XXXXX1234X"},
        ),
    )
    assert ok.event.credits == "2.95"
    assert ok.event.status == m.USAGE_STATUS_COMPLETED and ok.event.success
    assert ok.entry.amount == "-2.95" and ok.entry.reference == ok.event.event_id
    assert ok.event.entry_id == ok.entry.entry_id
    assert not ok.duplicate
    invalid = record(
        metering,
        event(funded, pan, status_code=200, message="Invalid Pan Number.", success=False),
    )
    assert invalid.event.credits == "2.95"  # the seed charges this one too
    assert not invalid.event.success
    failed = record(metering, event(funded, pan, status=m.USAGE_STATUS_FAILED, status_code=500))
    assert failed.event.credits == "2.95"  # this product charges failed calls
    assert client.get_balance(funded).balance == "91.15"
    assert_consistent(client, funded)


def test_failed_calls_minimum_and_stated_charges(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    images = product(metering, "0.1", minimum="0.25")
    failed = record(metering, event(funded, images, status=m.USAGE_STATUS_FAILED))
    assert failed.event.credits == "0" and not failed.HasField("entry")
    assert failed.event.entry_id == 0
    assert record(metering, event(funded, images, quantity=1)).event.credits == "0.25"
    assert record(metering, event(funded, images, quantity=7)).event.credits == "0.7"
    stated = record(metering, event(funded, images, quantity=7, credits="1.234567"))
    assert stated.event.credits == "1.234567"
    free = record(metering, event(funded, images, credits="0"))
    assert free.event.credits == "0" and not free.HasField("entry")
    assert client.get_balance(funded).balance == str(Decimal(100) - Decimal("2.184567"))
    assert_consistent(client, funded)


def test_duplicates_and_reused_event_ids(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    pan = product(metering, "1")
    e = event(funded, pan, endpoint="/a", start_time=ts(datetime.now(UTC) - timedelta(hours=1)))
    first = record(metering, e)
    again = record(metering, e)
    assert again.duplicate
    assert again.event == first.event and again.entry == first.entry
    changed = m.UsageEvent()
    changed.CopyFrom(e)
    changed.quantity = 2
    with pytest.raises(Exception) as info:
        record(metering, changed)
    assert info.value.reason == "EVENT_ID_REUSED"  # type: ignore[attr-defined]
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    assert client.get_balance(funded).balance == "99"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"quantity": -1}, "event.quantity"),
        ({"product_id": ""}, "event.product_id"),
        ({"event_id": ""}, "event.event_id"),
        ({"event_id": "bad id"}, "event.event_id"),
        ({"status": m.USAGE_STATUS_PENDING}, "event.status"),
        ({"status": m.USAGE_STATUS_FAILED, "success": True}, "event.success"),
        ({"credits": "-1"}, "event.credits"),
        ({"credits": "0.0000001"}, "event.credits"),
        ({"start_time": "future"}, "event.start_time"),
        ({"start_time": "ancient"}, "event.start_time"),
        ({"processing_time_ms": -5}, "event.processing_time_ms"),
    ],
)
def test_bad_events(
    client: TallyClient,
    metering: metering_pb2_grpc.MeteringServiceStub,
    funded: str,
    fields: dict[str, Any],
    field: str,
) -> None:
    now = datetime.now(UTC)
    if fields.get("start_time") == "future":
        fields["start_time"] = ts(now + timedelta(hours=1))
    elif fields.get("start_time") == "ancient":
        fields["start_time"] = ts(now - timedelta(days=36))
    fields.setdefault("product_id", "anything")
    with pytest.raises(Exception) as info:
        record(metering, event(funded, **fields))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert info.value.field_violations[0][0] == field  # type: ignore[attr-defined]
    assert client.get_balance(funded).balance == "100"


def test_unknown_ids_and_insufficient_credit(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, account_id: str
) -> None:
    pan = product(metering, "3")
    with pytest.raises(Exception) as no_account:
        record(metering, event(account_id, pan))
    assert no_account.value.reason == "ACCOUNT_NOT_FOUND"  # type: ignore[attr-defined]
    client.create_account(account_id)
    with pytest.raises(Exception) as no_product:
        record(metering, event(account_id, "no-such-product"))
    assert no_product.value.reason == "PRODUCT_NOT_FOUND"  # type: ignore[attr-defined]
    client.top_up(account_id, "5")
    record(metering, event(account_id, pan))
    with pytest.raises(Exception) as broke:
        record(metering, event(account_id, pan, event_id="too-much"))
    assert broke.value.reason == "INSUFFICIENT_CREDITS"  # type: ignore[attr-defined]
    assert broke.value.metadata["available"] == "2"  # type: ignore[attr-defined]
    # Nothing was written for the rejected event: it can be recorded once credit arrives.
    client.update_account(account_id, overdraft_limit="1")
    assert record(metering, event(account_id, pan, event_id="too-much")).event.credits == "3"
    assert client.get_balance(account_id).available == "-1"
    assert_consistent(client, account_id)


def test_batch_reports_per_event_and_replays(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    pan = product(metering, "10")
    events = [
        event(funded, pan, event_id="b-1"),
        event(funded, "no-such-product", event_id="b-2"),
        event(funded, pan, event_id="b-3", quantity=-1),
        event("no-such-account", pan, event_id="b-4"),
        event(funded, pan, event_id="b-5", quantity=20),  # 200 > what is left
        event(funded, pan, event_id="b-6", quantity=2),
    ]
    results = call(metering.RecordUsageBatch, m.RecordUsageBatchRequest(events=events)).results
    assert [r.index for r in results] == list(range(6))
    codes = [r.status.code for r in results]
    assert codes == [
        0,
        5,
        3,
        5,
        9,
        0,
    ]  # OK, NOT_FOUND, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION
    assert [r.HasField("result") for r in results] == [c == 0 for c in codes]
    assert results[0].result.event.credits == "10" and results[5].result.entry.amount == "-20"
    assert client.get_balance(funded).balance == "70"
    replay = call(metering.RecordUsageBatch, m.RecordUsageBatchRequest(events=events)).results
    assert replay[0].result.duplicate and replay[5].result.duplicate
    assert replay[0].result.event == results[0].result.event
    assert client.get_balance(funded).balance == "70"
    with pytest.raises(Exception) as too_many:
        call(
            metering.RecordUsageBatch,
            m.RecordUsageBatchRequest(events=[event(funded, pan) for _ in range(1001)]),
        )
    assert too_many.value.field_violations[0][0] == "events"  # type: ignore[attr-defined]
    assert_consistent(client, funded)


def test_stream_replay_changes_nothing(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, account_id: str
) -> None:
    client.create_account(account_id)
    client.top_up(account_id, "1000")
    ocr = product(metering, "0.001")
    events = [event(account_id, ocr, endpoint=f"/p{i % 3}") for i in range(1200)]
    events.append(event(account_id, "nope"))

    def stream() -> Iterator[m.StreamUsageRequest]:
        for e in events:
            yield m.StreamUsageRequest(event=e)

    first = call(metering.StreamUsage, stream())
    assert (first.recorded, first.duplicates, first.failed) == (1200, 0, 1)
    assert first.failures[0].index == 1200 and first.failures[0].status.code == 5
    second = call(metering.StreamUsage, stream())
    assert (second.recorded, second.duplicates, second.failed) == (0, 1200, 1)
    assert client.get_balance(account_id).balance == "998.8"
    usage = call(metering.GetUsage, m.GetUsageRequest(account_id=account_id))
    assert usage.totals.total_requests == 1200
    assert dict(usage.requests_by_endpoint) == {"/p0": 400, "/p1": 400, "/p2": 400}
    assert_consistent(client, account_id)


def test_long_job_complete_captures_actual(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    pages = product(metering, "0.5")
    started = call(
        metering.StartUsage,
        m.StartUsageRequest(event=event(funded, pages, event_id="job-1", quantity=10)),
    )
    assert started.event.status == m.USAGE_STATUS_PENDING
    assert started.reservation.amount == "5"
    assert client.get_balance(funded).available == "95"
    assert (
        call(
            metering.StartUsage,
            m.StartUsageRequest(event=event(funded, pages, event_id="job-1", quantity=10)),
        ).event
        == started.event
    )
    complete = m.CompleteUsageRequest(
        account_id=funded,
        event_id="job-1",
        quantity=6,
        status_code=200,
        message="done",
        result_metadata=struct({"pages": 6}),
    )
    done = call(metering.CompleteUsage, complete)
    assert done.event.status == m.USAGE_STATUS_COMPLETED and done.event.credits == "3"
    assert (
        done.entry.amount == "-3"
        and done.entry.reservation_id == started.reservation.reservation_id
    )
    assert call(metering.CompleteUsage, complete) == done
    with pytest.raises(Exception) as late_fail:
        call(metering.FailUsage, m.FailUsageRequest(account_id=funded, event_id="job-1"))
    assert late_fail.value.reason == "EVENT_NOT_PENDING"  # type: ignore[attr-defined]
    balance = client.get_balance(funded)
    assert (balance.balance, balance.reserved) == ("97", "0")
    with pytest.raises(Exception) as missing:
        call(metering.CompleteUsage, m.CompleteUsageRequest(account_id=funded, event_id="nope"))
    assert missing.value.code == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert_consistent(client, funded)


def test_long_job_fail_and_overrun(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    free_fail = product(metering, "1")
    paid_fail = product(metering, "1", charge_failed=True)
    call(metering.StartUsage, m.StartUsageRequest(event=event(funded, free_fail, event_id="f1")))
    failed = call(
        metering.FailUsage,
        m.FailUsageRequest(account_id=funded, event_id="f1", status_code=502, message="upstream"),
    )
    assert failed.event.status == m.USAGE_STATUS_FAILED and failed.event.credits == "0"
    call(metering.StartUsage, m.StartUsageRequest(event=event(funded, paid_fail, event_id="f2")))
    charged = call(metering.FailUsage, m.FailUsageRequest(account_id=funded, event_id="f2"))
    assert charged.event.credits == "1" and charged.entry.amount == "-1"
    call(metering.StartUsage, m.StartUsageRequest(event=event(funded, free_fail, event_id="f3")))
    with pytest.raises(Exception) as overrun:
        call(
            metering.CompleteUsage,
            m.CompleteUsageRequest(account_id=funded, event_id="f3", quantity=2),
        )
    assert overrun.value.reason == "CAPTURE_EXCEEDS_HOLD"  # type: ignore[attr-defined]
    assert client.get_balance(funded).reserved == "1"
    assert_consistent(client, funded)


def test_expired_job_fails_and_charges_nothing(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    job = product(metering, "40")
    call(
        metering.StartUsage,
        m.StartUsageRequest(event=event(funded, job, event_id="exp-1"), ttl_seconds=1),
    )
    assert client.get_balance(funded).available == "60"
    time.sleep(1.2)
    assert client.get_balance(funded).available == "100"
    listed = call(metering.ListUsageEvents, m.ListUsageEventsRequest(account_id=funded)).events
    assert (listed[0].status, listed[0].message) == (m.USAGE_STATUS_FAILED, "EXPIRED")
    with pytest.raises(Exception) as late:
        call(metering.CompleteUsage, m.CompleteUsageRequest(account_id=funded, event_id="exp-1"))
    assert late.value.reason == "EVENT_NOT_PENDING"  # type: ignore[attr-defined]
    usage = call(metering.GetUsage, m.GetUsageRequest(account_id=funded))
    assert (usage.totals.total_requests, usage.totals.failed_requests) == (1, 1)
    assert usage.totals.credits_consumed == "0"
    assert_consistent(client, funded)


def test_get_usage_daily_buckets_in_kolkata(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, account_id: str
) -> None:
    client.create_account(account_id, time_zone="Asia/Kolkata")
    client.top_up(account_id, "100")
    api = product(metering, "1")
    other = product(metering, "2")
    today_ist = datetime.now(UTC).astimezone(UTC).date() - timedelta(days=3)
    # 18:29:59Z is 23:59:59 IST; 18:30Z is the next IST day.
    boundary = datetime(today_ist.year, today_ist.month, today_ist.day, 18, 30, tzinfo=UTC)
    times = [boundary - timedelta(seconds=1), boundary, boundary + timedelta(minutes=7)]
    for t, p, endpoint in zip(times, [api, api, other], ["/a", "/b", "/a"], strict=True):
        record(metering, event(account_id, p, endpoint=endpoint, start_time=ts(t)))
    start = boundary - timedelta(days=1)  # 00:00 IST of the first day
    usage = call(
        metering.GetUsage,
        m.GetUsageRequest(
            account_id=account_id,
            period=m.USAGE_PERIOD_DAILY,
            time_range=m.UsageRange(
                start_time=ts(start), end_time=ts(boundary + timedelta(days=1))
            ),
        ),
    )
    assert [b.total_requests for b in usage.buckets] == [1, 2]
    assert [b.credits_consumed for b in usage.buckets] == ["1", "3"]
    assert usage.buckets[1].period_start.ToDatetime(tzinfo=UTC) == boundary
    assert usage.totals.total_requests == 3 and usage.totals.credits_consumed == "4"
    assert dict(usage.requests_by_endpoint) == {"/a": 2, "/b": 1}
    assert dict(usage.credits_by_product) == {api: "2", other: "2"}
    only_other = call(
        metering.GetUsage,
        m.GetUsageRequest(
            account_id=account_id,
            period=m.USAGE_PERIOD_DAILY,
            product_id=other,
            time_range=m.UsageRange(
                start_time=ts(start), end_time=ts(boundary + timedelta(days=1))
            ),
        ),
    )
    assert only_other.totals.total_requests == 1
    # A range cutting through a 15-minute bucket is still exact (edge events counted raw).
    cut = call(
        metering.GetUsage,
        m.GetUsageRequest(
            account_id=account_id,
            time_range=m.UsageRange(
                start_time=ts(boundary), end_time=ts(boundary + timedelta(minutes=5))
            ),
        ),
    )
    assert cut.totals.total_requests == 1
    with pytest.raises(Exception) as both:
        call(
            metering.GetUsage,
            m.GetUsageRequest(
                account_id=account_id,
                time_range=m.UsageRange(preset=m.RANGE_PRESET_TODAY, start_time=ts(start)),
            ),
        )
    assert both.value.field_violations[0][0] == "time_range.preset"  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):
        call(
            metering.GetUsage,
            m.GetUsageRequest(
                account_id=account_id,
                time_range=m.UsageRange(start_time=ts(boundary), end_time=ts(start)),
            ),
        )


def test_summary_months_and_account_summary(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    api = product(metering, "1.5")
    now = datetime.now(UTC)
    month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
    record(metering, event(funded, api, start_time=ts(month_start - timedelta(hours=1))))
    record(
        metering, event(funded, api, start_time=ts(month_start - timedelta(hours=2)), success=False)
    )
    record(
        metering,
        event(
            funded,
            api,
            request_metadata={"schema": {"type": "invoice"}},
            webhook_url="https://hooks.example/x",
            processing_time_ms=2000,
        ),
    )
    summary = call(metering.GetUsageSummary, m.GetUsageSummaryRequest(account_id=funded))
    assert (summary.previous_month.total_requests, summary.previous_month.failed_requests) == (2, 1)
    assert summary.previous_month.average_credits_per_request == "1.5"
    assert summary.current_month.total_requests == 1
    assert summary.balance.balance == "95.5"
    assert summary.account.account_id == funded
    recent = summary.recent_events[0]
    assert recent.processing_time_ms == 2000 and recent.webhook_url == "https://hooks.example/x"
    assert recent.request_metadata["schema"]["type"] == "invoice"
    assert recent.credit_type == m.CREDIT_TYPE_PURCHASED
    overview = client.stubs.accounts.GetAccountSummary.__self__ if False else None
    from tally.v1 import accounts_pb2, accounts_pb2_grpc

    accounts = accounts_pb2_grpc.AccountsServiceStub(client.channel)
    overview = call(
        accounts.GetAccountSummary, accounts_pb2.GetAccountSummaryRequest(account_id=funded)
    )
    assert overview.total_requests_all_time == 3
    assert overview.usage_this_month.totals.total_requests == 1
    assert overview.credit_balance.balance == "95.5"
    assert overview.subscription.status == accounts_pb2.SUBSCRIPTION_STATUS_NONE
    assert overview.HasField("last_activity_time") and overview.HasField("account_create_time")


def test_list_usage_events_pages_through_events_of_one_instant(
    metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    """Pages split between events that share a start time (the keyset's tie on event_id),
    with and without a product filter, return every event once, newest first."""
    pan = product(metering, "1")
    ocr = product(metering, "1")
    base = datetime.now(UTC) - timedelta(hours=2)
    instants = [base, base + timedelta(minutes=1), base + timedelta(minutes=1), base]
    expected: list[tuple[datetime, str]] = []
    for i in range(12):
        at = instants[i % 4] + timedelta(minutes=2 * (i // 8))
        record(
            metering,
            event(funded, pan if i % 3 else ocr, event_id=f"tie-{i:02d}", start_time=ts(at)),
        )
        expected.append((at, f"tie-{i:02d}"))
    expected.sort(reverse=True)
    for product_id in ("", pan):
        want = [event_id for at, event_id in expected if not product_id or int(event_id[4:]) % 3]
        seen: list[str] = []
        token = ""
        while True:
            page = call(
                metering.ListUsageEvents,
                m.ListUsageEventsRequest(
                    account_id=funded, product_id=product_id, page_size=2, page_token=token
                ),
            )
            seen += [e.event_id for e in page.events]
            token = page.next_page_token
            if not token:
                break
        assert seen == want


def test_list_usage_events_report_rows(
    client: TallyClient, metering: metering_pb2_grpc.MeteringServiceStub, funded: str
) -> None:
    pan = product(metering, "2.95")
    ocr = product(metering, "1")
    base = datetime.now(UTC) - timedelta(hours=5)
    for i in range(5):
        record(
            metering,
            event(
                funded,
                pan,
                event_id=f"tx-{i}",
                start_time=ts(base + timedelta(minutes=i)),
                status_code=200,
                message="Pan Verified Successfully.",
            ),
        )
    record(metering, event(funded, ocr, event_id="tx-ocr"))
    page = call(
        metering.ListUsageEvents,
        m.ListUsageEventsRequest(account_id=funded, product_id=pan, page_size=2),
    )
    assert [e.event_id for e in page.events] == ["tx-4", "tx-3"]
    row = page.events[0]
    assert (row.product_id, row.status_code, row.message, row.credits) == (
        pan,
        200,
        "Pan Verified Successfully.",
        "2.95",
    )
    rest = call(
        metering.ListUsageEvents,
        m.ListUsageEventsRequest(
            account_id=funded, product_id=pan, page_size=10, page_token=page.next_page_token
        ),
    )
    assert [e.event_id for e in rest.events] == ["tx-2", "tx-1", "tx-0"]
    assert not rest.next_page_token
    everything = call(metering.ListUsageEvents, m.ListUsageEventsRequest(account_id=funded))
    assert len(everything.events) == 6
    now = datetime.now(UTC)
    with pytest.raises(Exception) as too_long:
        call(
            metering.ListUsageEvents,
            m.ListUsageEventsRequest(
                account_id=funded,
                time_range=m.UsageRange(start_time=ts(now - timedelta(days=8)), end_time=ts(now)),
            ),
        )
    assert "7 days" in too_long.value.message  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):
        call(
            metering.ListUsageEvents,
            m.ListUsageEventsRequest(
                account_id=funded, product_id=ocr, page_token=page.next_page_token
            ),
        )
