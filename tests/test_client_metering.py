"""The client's MeteringService and GetAccountSummary methods, and the metering
commands of tallyctl, against a real server."""

import asyncio
import csv
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from tally.v1 import accounts_pb2, ledger_pb2, metering_pb2
from tally_client import (
    AccountNotFound,
    AsyncTallyClient,
    EventIdReused,
    EventNotFound,
    EventNotPending,
    ProductNotFound,
    TallyClient,
    Unavailable,
    error_from_status,
    usage_event,
)
from tally_client import _requests as rq
from tally_client.cli import main as tallyctl
from tests.conftest import ServerProcess
from tests.support import FAST_RECONNECT, DroppingProxy, assert_consistent

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def product(client: TallyClient) -> str:
    """A product at 2.5 credits per unit."""
    product_id = new_id("P")
    client.upsert_product(product_id, "2.5", display_name="Test product")
    return product_id


# --- request builders (no server) -------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Today", metering_pb2.RANGE_PRESET_TODAY),
        ("yesterday", metering_pb2.RANGE_PRESET_YESTERDAY),
        ("Last 7 days", metering_pb2.RANGE_PRESET_LAST_7_DAYS),
        ("last_30_days", metering_pb2.RANGE_PRESET_LAST_30_DAYS),
        ("this-month", metering_pb2.RANGE_PRESET_THIS_MONTH),
        ("Last Month", metering_pb2.RANGE_PRESET_LAST_MONTH),
        ("RANGE_PRESET_LAST_MONTH", metering_pb2.RANGE_PRESET_LAST_MONTH),
        (metering_pb2.RANGE_PRESET_TODAY, metering_pb2.RANGE_PRESET_TODAY),
        (None, metering_pb2.RANGE_PRESET_UNSPECIFIED),
    ],
)
def test_range_preset_names(given: rq.RangePresetArg, expected: int) -> None:
    assert rq.range_preset(given) == expected


def test_enum_names_and_errors() -> None:
    assert rq.usage_status("completed") == metering_pb2.USAGE_STATUS_COMPLETED
    assert rq.usage_status("PROCESSING") == metering_pb2.USAGE_STATUS_PROCESSING
    assert rq.usage_period("daily") == metering_pb2.USAGE_PERIOD_DAILY
    assert rq.usage_period("year") == metering_pb2.USAGE_PERIOD_YEARLY
    assert rq.report_format("csv") == metering_pb2.REPORT_FORMAT_CSV
    with pytest.raises(ValueError, match="last_7_days"):
        rq.range_preset("last week")
    with pytest.raises(ValueError, match="give either a preset or start_time"):
        rq.get_usage("a", preset="today", start_time=datetime.now(UTC))
    with pytest.raises(TypeError):
        rq.usage_status(True)


def test_usage_event_leaves_defaults_unset() -> None:
    event = usage_event("a", "e", "p")
    assert not event.HasField("success") and not event.HasField("quantity")
    assert not event.HasField("start_time") and event.credits == ""
    event = usage_event("a", "e", "p", success=False, quantity=0, credits="1.5")
    assert event.HasField("success") and event.HasField("quantity")
    assert (event.success, event.quantity, event.credits) == (False, 0, "1.5")


# --- catalog ----------------------------------------------------------------------


def test_upsert_and_list_products(client: TallyClient) -> None:
    product_id = new_id("P")
    p = client.upsert_product(
        product_id, "0.5", display_name="PAN Plus", charge_failed=True, minimum_charge="0.1"
    )
    assert (p.product_id, p.display_name, p.credits_per_unit) == (product_id, "PAN Plus", "0.5")
    assert (p.charge_failed, p.minimum_charge) == (True, "0.1")
    assert p.HasField("create_time") and p.HasField("update_time")

    p = client.upsert_product(product_id, "0.75")
    assert (p.credits_per_unit, p.charge_failed, p.display_name) == ("0.75", False, "")

    other = client.upsert_product(new_id("P"), "1").product_id
    page = client.list_products(page_size=1)
    assert len(page.products) == 1 and page.next_page_token
    listed = [x.product_id for x in client.iter_products(page_size=1)]
    assert {product_id, other} <= set(listed) and listed == sorted(listed)


# --- recording --------------------------------------------------------------------


def test_record_usage_charges_once(client: TallyClient, funded: str, product: str) -> None:
    event_id = new_id("txn")
    kwargs = dict(
        endpoint="/pan/verify",
        status="completed",
        status_code=200,
        message="Valid PAN",
        quantity=2,
        request_metadata={"pan": "ABCDE1234F"},
        result_metadata={"valid": True},
        processing_time_ms=120,
        webhook_url="https://example.invalid/hook",
    )
    r = client.record_usage(funded, event_id, product, **kwargs)  # type: ignore[arg-type]
    assert not r.duplicate
    assert r.event.status == metering_pb2.USAGE_STATUS_COMPLETED
    assert (r.event.credits, r.event.quantity, r.event.success) == ("5", 2, True)
    assert (r.event.status_code, r.event.message, r.event.endpoint) == (
        200,
        "Valid PAN",
        "/pan/verify",
    )
    assert r.entry.type == ledger_pb2.ENTRY_TYPE_DEBIT and r.entry.amount == "-5"
    assert r.event.entry_id == r.entry.entry_id

    again = client.record_usage(funded, event_id, product, **kwargs)  # type: ignore[arg-type]
    assert again.duplicate and again.event.entry_id == r.event.entry_id
    assert client.get_balance(funded).balance == "95"

    with pytest.raises(EventIdReused) as err:
        client.record_usage(funded, event_id, product, quantity=3)
    assert err.value.reason == "EVENT_ID_REUSED"
    assert_consistent(client, funded)


def test_record_failed_usage_is_not_charged(client: TallyClient, funded: str, product: str) -> None:
    r = client.record_usage(
        funded, new_id("txn"), product, status="failed", status_code=422, message="Invalid Pan"
    )
    assert r.event.status == metering_pb2.USAGE_STATUS_FAILED
    assert not r.event.success
    assert r.event.entry_id == 0 and not r.HasField("entry")
    assert client.get_balance(funded).balance == "100"


def test_record_usage_batch_with_per_item_error(
    client: TallyClient, funded: str, product: str
) -> None:
    good = client.usage_event(funded, new_id("txn"), product, credits="1.25")
    bad = usage_event(funded, new_id("txn"), new_id("missing"))
    response = client.record_usage_batch([good, bad])
    assert [r.index for r in response.results] == [0, 1]
    ok, failed = response.results
    assert error_from_status(ok.status) is None
    assert ok.result.event.credits == "1.25" and ok.result.entry.amount == "-1.25"
    error = error_from_status(failed.status)
    assert isinstance(error, ProductNotFound)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert (error.reason, error.domain) == ("PRODUCT_NOT_FOUND", "tally")
    assert error.status is failed.status
    assert failed.event_id == bad.event_id
    assert client.get_balance(funded).balance == "98.75"


def test_stream_usage(client: TallyClient, funded: str, product: str) -> None:
    events = [usage_event(funded, new_id("txn"), product) for _ in range(3)]
    response = client.stream_usage(events)
    assert (response.recorded, response.duplicates, response.failed) == (3, 0, 0)

    def more() -> Iterator[metering_pb2.UsageEvent]:
        yield events[0]  # a duplicate
        yield usage_event(funded, new_id("txn"), product)
        yield usage_event(new_id("nobody"), new_id("txn"), product)

    response = client.stream_usage(more())
    assert (response.recorded, response.duplicates, response.failed) == (1, 1, 1)
    (failure,) = response.failures
    assert failure.index == 2
    assert isinstance(error_from_status(failure.status), AccountNotFound)
    assert client.get_balance(funded).balance == "90"


def test_stream_usage_reraises_the_iterables_error(client: TallyClient, funded: str) -> None:
    def broken() -> Iterator[metering_pb2.UsageEvent]:
        raise RuntimeError("producer failed")
        yield  # pragma: no cover

    with pytest.raises(RuntimeError, match="producer failed"):
        client.stream_usage(broken())


def test_start_complete_and_fail_usage(client: TallyClient, funded: str, product: str) -> None:
    event_id = new_id("job")
    started = client.start_usage(
        funded,
        event_id,
        product,
        endpoint="/ocr",
        status="processing",
        quantity=4,
        ttl_seconds=600,
        request_metadata={"pages": 4},
    )
    assert started.event.status == metering_pb2.USAGE_STATUS_PROCESSING
    assert started.reservation.amount == "10"
    assert started.event.reservation_id == started.reservation.reservation_id
    assert client.get_balance(funded).available == "90"

    # A retried start (same payload) is answered with the same event and hold.
    again = client.start_usage(
        funded,
        event_id,
        product,
        endpoint="/ocr",
        status="processing",
        quantity=4,
        ttl_seconds=600,
        request_metadata={"pages": 4},
    )
    assert again.reservation.reservation_id == started.reservation.reservation_id

    def complete() -> metering_pb2.CompleteUsageResponse:
        return client.complete_usage(
            funded, event_id, quantity=3, status_code=200, message="done", result_metadata={"ok": 1}
        )

    done = complete()
    assert complete().entry.entry_id == done.entry.entry_id  # a retry charges nothing more
    assert done.event.status == metering_pb2.USAGE_STATUS_COMPLETED
    assert (done.event.quantity, done.event.credits) == (3, "7.5")
    assert done.entry.amount == "-7.5"
    balance = client.get_balance(funded)
    assert (balance.balance, balance.reserved, balance.available) == ("92.5", "0", "92.5")

    with pytest.raises(EventNotPending) as err:
        client.fail_usage(funded, event_id, message="too late")
    assert err.value.reason == "EVENT_NOT_PENDING"

    other = new_id("job")
    client.start_usage(funded, other, product, credits="3")
    failed = client.fail_usage(funded, other, status_code=500, message="crashed")
    assert failed.event.status == metering_pb2.USAGE_STATUS_FAILED
    assert failed.event.message == "crashed" and not failed.HasField("entry")
    assert client.get_balance(funded).available == "92.5"

    with pytest.raises(EventNotFound):
        client.complete_usage(funded, new_id("never-started"))
    assert_consistent(client, funded)


# --- questions --------------------------------------------------------------------


def test_get_usage(client: TallyClient, funded: str, product: str) -> None:
    now = datetime.now(UTC)
    client.record_usage(funded, new_id("txn"), product, endpoint="/a", start_time=now)
    client.record_usage(
        funded, new_id("txn"), product, endpoint="/b", status="failed", start_time=now
    )
    usage = client.get_usage(funded, period="daily", preset="Last 7 days")
    assert usage.account_id == funded and usage.period == metering_pb2.USAGE_PERIOD_DAILY
    totals = usage.totals
    assert (totals.total_requests, totals.successful_requests, totals.failed_requests) == (2, 1, 1)
    assert (totals.credits_consumed, totals.average_credits_per_request) == ("2.5", "1.25")
    assert dict(usage.requests_by_endpoint) == {"/a": 1, "/b": 1}
    assert dict(usage.requests_by_product) == {product: 2}
    assert dict(usage.credits_by_product) == {product: "2.5"}
    assert len(usage.buckets) == 7
    assert sum(b.total_requests for b in usage.buckets) == 2

    ranged = client.get_usage(
        funded,
        start_time=now - timedelta(hours=1),
        end_time=now + timedelta(minutes=1),
        product_id=product,
    )
    assert ranged.period == metering_pb2.USAGE_PERIOD_MONTHLY
    assert ranged.totals.total_requests == 2


def test_get_usage_summary(client: TallyClient, funded: str, product: str) -> None:
    for _ in range(3):
        client.record_usage(funded, new_id("txn"), product)
    summary = client.get_usage_summary(funded, recent_events=2)
    assert summary.account.account_id == funded
    assert summary.balance.balance == "92.5"
    assert summary.current_month.total_requests == 3
    assert summary.current_month.credits_consumed == "7.5"
    assert len(summary.recent_events) == 2


def test_list_and_iter_usage_events(client: TallyClient, funded: str, product: str) -> None:
    start = datetime.now(UTC) - timedelta(minutes=10)
    ids = [new_id("txn") for _ in range(3)]
    for i, event_id in enumerate(ids):
        client.record_usage(funded, event_id, product, start_time=start + timedelta(minutes=i))
    page = client.list_usage_events(funded, page_size=2, product_id=product)
    assert [e.event_id for e in page.events] == [ids[2], ids[1]]
    assert page.next_page_token
    events = list(
        client.iter_usage_events(funded, start_time=start, end_time=datetime.now(UTC), page_size=1)
    )
    assert [e.event_id for e in events] == ids[::-1]
    assert all(e.credits == "2.5" for e in events)


def test_list_usage_events_pages_without_a_range(
    client: TallyClient, funded: str, product: str
) -> None:
    for _ in range(2):
        client.record_usage(funded, new_id("txn"), product)
    first = client.list_usage_events(funded, page_size=1)
    assert first.next_page_token
    # The token keeps the range the first page resolved (its "now").
    second = client.list_usage_events(funded, page_size=1, page_token=first.next_page_token)
    assert len(second.events) == 1 and second.events[0].event_id != first.events[0].event_id
    assert not second.next_page_token


def test_export_usage_report(
    client: TallyClient, funded: str, product: str, tmp_path: Path
) -> None:
    event_id = new_id("txn")
    client.record_usage(funded, event_id, product, message="Valid PAN", status_code=200)
    data = b"".join(client.export_usage_report(funded, format="csv", preset="today"))
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    assert rows[0][0] == "Transaction Id"
    assert [r[0] for r in rows[1:]] == [event_id]

    target = tmp_path / "report.xlsx"
    file_name, content_type, written = client.export_usage_report_to(
        target, funded, preset="this_month", product_id=product
    )
    assert file_name.startswith(f"usage-{funded}-") and file_name.endswith(".xlsx")
    assert content_type == XLSX
    assert written == target.stat().st_size > 0
    assert target.read_bytes()[:2] == b"PK"  # a zip container
    assert not (tmp_path / "report.xlsx.part").exists()

    openpyxl = pytest.importorskip("openpyxl")
    workbook = openpyxl.load_workbook(target, read_only=True)
    first = workbook.worksheets[0]
    values = [list(r) for r in first.iter_rows(values_only=True)]
    assert values[0][0] == "Transaction Id" and values[1][0] == event_id


def test_get_account_summary(client: TallyClient, funded: str, product: str) -> None:
    client.record_usage(funded, new_id("txn"), product, quantity=2)
    s = client.get_account_summary(funded)
    assert isinstance(s, accounts_pb2.GetAccountSummaryResponse)
    assert s.account.account_id == funded
    assert s.credit_balance.balance == "95"
    assert s.subscription.status == accounts_pb2.SUBSCRIPTION_STATUS_NONE
    assert s.usage_this_month.totals.total_requests == 1
    assert s.usage_this_month.totals.credits_consumed == "5"
    assert s.total_requests_all_time == 1
    assert s.account_create_time == s.account.create_time
    assert s.HasField("last_activity_time")
    with pytest.raises(AccountNotFound):
        client.get_account_summary(new_id("nobody"))


# --- async client -----------------------------------------------------------------


def test_async_client_metering(server: ServerProcess, funded: str) -> None:
    async def run(tmp: Path) -> None:
        async with AsyncTallyClient(server.target, timeout_seconds=10) as c:
            product_id = new_id("P")
            assert (await c.upsert_product(product_id, "1")).credits_per_unit == "1"
            assert product_id in {p.product_id async for p in c.iter_products()}
            r = await c.record_usage(funded, new_id("txn"), product_id)
            assert r.entry.amount == "-1"

            async def events() -> AsyncIterator[metering_pb2.UsageEvent]:
                for _ in range(2):
                    yield c.usage_event(funded, new_id("txn"), product_id)

            streamed = await c.stream_usage(events())
            assert (streamed.recorded, streamed.failed) == (2, 0)
            batch = await c.record_usage_batch([usage_event(funded, new_id("txn"), product_id)])
            assert error_from_status(batch.results[0].status) is None

            job = new_id("job")
            await c.start_usage(funded, job, product_id, quantity=2)
            done = await c.complete_usage(funded, job, quantity=1)
            assert done.entry.amount == "-1"
            job = new_id("job")
            await c.start_usage(funded, job, product_id)
            assert (await c.fail_usage(funded, job)).event.status == (
                metering_pb2.USAGE_STATUS_FAILED
            )

            usage = await c.get_usage(funded, preset="Today", period="daily")
            assert usage.totals.total_requests == 6
            assert (await c.get_usage_summary(funded)).current_month.credits_consumed == "5"
            assert len([e async for e in c.iter_usage_events(funded, page_size=2)]) == 6
            page = await c.list_usage_events(funded, product_id=product_id)
            assert len(page.events) == 6

            chunks = [b async for b in c.export_usage_report(funded, format="csv")]
            assert b"".join(chunks).count(b"\n") == 7  # the header and the 6 finished events
            name, ctype, size = await c.export_usage_report_to(tmp / "r.csv", funded)
            assert (ctype, size) == ("text/csv", (tmp / "r.csv").stat().st_size)
            assert name.endswith(".csv")
            summary = await c.get_account_summary(funded)
            assert summary.total_requests_all_time == 6

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))


# --- tallyctl ---------------------------------------------------------------------


def test_tallyctl_metering_commands(
    server: ServerProcess,
    client: TallyClient,
    funded: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = ["--target", server.target]
    product_id = new_id("P")
    assert (
        tallyctl(
            [
                *target,
                "products",
                "upsert",
                product_id,
                "1.5",
                "--charge-failed",
                "--minimum-charge",
                "0.5",
                "--display-name",
                "Face Match",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert product_id in out and "Face Match" in out and "1.5" in out

    assert tallyctl([*target, "products", "list"]) == 0
    out = capsys.readouterr().out
    assert "CREDITS_PER_UNIT" in out and product_id in out

    event_id = new_id("txn")
    client.record_usage(
        funded, event_id, product_id, endpoint="/face", status_code=200, message="Matched"
    )
    client.record_usage(funded, new_id("txn"), product_id, status="failed", message="No face")

    assert tallyctl([*target, "usage", funded, "--period", "daily", "--preset", "Last 7 days"]) == 0
    out = capsys.readouterr().out
    assert "total_requests:" in out and "credits_consumed:" in out
    assert "By endpoint:" in out and "/face" in out
    assert "By product:" in out and product_id in out
    assert "By day:" in out and "3" in out  # 1.5 + the failed call charged 1.5

    assert tallyctl([*target, "usage-events", funded, "--product", product_id, "--limit", "5"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for column in ("Transaction Id", "Timestamp(UTC)", "Product Id", "Status", "Message", "Charge"):
        assert column in header
    assert event_id in out and "completed 200" in out and "Matched" in out

    report = tmp_path / "usage.csv"
    assert tallyctl([*target, "export", funded, "--out", str(report), "--preset", "today"]) == 0
    out = capsys.readouterr().out
    assert "text/csv" in out and report.read_text(encoding="utf-8-sig").count(event_id) == 1

    assert tallyctl([*target, "summary", funded]) == 0
    out = capsys.readouterr().out
    assert funded in out and "total_requests_all_time:" in out and "subscription:" in out

    # Errors: exit 1 with the reason; a usage error exits 2.
    assert tallyctl([*target, "summary", new_id("nobody")]) == 1
    assert "ACCOUNT_NOT_FOUND" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tallyctl([*target, "usage", funded, "--preset", "today", "--start", "2024-01-01T00:00Z"])
    assert exit_info.value.code == 2


# --- retry policy of the streaming calls, against the real server behind a proxy ----
# The proxy stands for the network (outside the service): it drops the first
# connections it accepts, so the real server is reached only on a retry.


def test_stream_usage_retries_only_a_sequence(
    server: ServerProcess, client: TallyClient, funded: str, product: str
) -> None:
    events = [usage_event(funded, f"retry-{uuid.uuid4()}", product) for _ in range(3)]
    proxy = DroppingProxy(server.target, drops=1)
    try:
        with TallyClient(proxy.target, max_attempts=4, options=FAST_RECONNECT) as c:
            assert c.stream_usage(events).recorded == 3
        assert proxy.accepted >= 2
    finally:
        proxy.close()
    proxy = DroppingProxy(server.target, drops=1)
    try:
        with (
            TallyClient(proxy.target, max_attempts=4, options=FAST_RECONNECT) as c,
            pytest.raises(Unavailable),
        ):
            c.stream_usage(iter([usage_event(funded, f"once-{uuid.uuid4()}", product)]))
    finally:
        proxy.close()
    # The retried stream recorded every event exactly once.
    assert client.get_balance(funded).balance == "92.5"  # 100 - 3 * 2.5


def test_export_retries_before_the_first_chunk(
    server: ServerProcess, funded: str, tmp_path: Path
) -> None:
    proxy = DroppingProxy(server.target, drops=1)
    try:
        with TallyClient(proxy.target, max_attempts=4, options=FAST_RECONNECT) as c:
            data = b"".join(c.export_usage_report(funded, format="csv"))
        assert data.startswith(b"Transaction Id,")
    finally:
        proxy.close()

    async def run() -> None:
        proxy = DroppingProxy(server.target, drops=1)
        try:
            async with AsyncTallyClient(proxy.target, max_attempts=4, options=FAST_RECONNECT) as c:
                out = tmp_path / "r.csv"
                name, content_type, written = await c.export_usage_report_to(out, funded)
                assert name.endswith(".csv")
                assert content_type == "text/csv" and written == out.stat().st_size
        finally:
            proxy.close()

    asyncio.run(run())
