"""Prometheus metrics: definitions and derivations on a fresh registry, the interceptor in
process, the pool and query metrics on a real engine, and /metrics of a real server."""

import asyncio
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from tally.v1 import credits_pb2, ledger_pb2, metering_pb2
from tally_client import TallyClient
from tally_client.errors import InsufficientCredits
from tally_service import errors, metrics
from tally_service.db import make_engine, migrate
from tally_service.interceptors import ErrorMappingInterceptor
from tests.conftest import ServerProcess, _create_database, _with_database, free_port, start_server

# -- helpers ----------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _fresh() -> tuple[CollectorRegistry, metrics.Metrics]:
    registry = CollectorRegistry()
    return registry, metrics.Metrics(registry)


def _parse(exposition: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _entry(
    entry_type: ledger_pb2.EntryType.ValueType, reservation_id: str = ""
) -> ledger_pb2.LedgerEntry:
    return ledger_pb2.LedgerEntry(entry_id=7, type=entry_type, reservation_id=reservation_id)


# -- pure functions ---------------------------------------------------------------------


def test_code_names_follow_go_grpc_prometheus() -> None:
    assert metrics.code_name(grpc.StatusCode.OK) == "OK"
    assert metrics.code_name(grpc.StatusCode.CANCELLED) == "Canceled"
    assert metrics.code_name(grpc.StatusCode.FAILED_PRECONDITION) == "FailedPrecondition"
    assert metrics.code_name(grpc.StatusCode.DEADLINE_EXCEEDED) == "DeadlineExceeded"
    assert metrics.code_name(grpc.StatusCode.UNAVAILABLE) == "Unavailable"


def test_credit_strings_become_floats_only_for_monitoring() -> None:
    assert metrics.credits_value("2.95") == pytest.approx(2.95)
    assert metrics.credits_value("0.000001") == pytest.approx(1e-6)
    assert metrics.credits_value("") == 0.0
    assert metrics.credits_value("garbage") == 0.0


def test_labels_of_enums() -> None:
    assert metrics.usage_status_label(metering_pb2.USAGE_STATUS_COMPLETED) == "completed"
    assert metrics.entry_type_label(ledger_pb2.ENTRY_TYPE_ADJUSTMENT) == "adjustment"
    assert metrics.entry_type_label(999) == "unknown"


def test_parse_address() -> None:
    assert metrics.parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics.parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert metrics.parse_address("[::1]:9464") == ("::1", 9464)
    assert metrics.parse_address(":9464") == ("0.0.0.0", 9464)
    with pytest.raises(ValueError):
        metrics.parse_address("9464")


# -- definitions ------------------------------------------------------------------------


def test_every_series_starts_at_zero_on_a_fresh_registry() -> None:
    registry, m = _fresh()
    m.initialize_rpcs(["tally.v1.CreditsService", "tally.v1.MeteringService"])
    labels = {"grpc_type": "unary", "grpc_service": "tally.v1.CreditsService"}
    assert (
        registry.get_sample_value(
            "grpc_server_handled_total", {**labels, "grpc_method": "TopUp", "grpc_code": "OK"}
        )
        == 0.0
    )
    assert (
        registry.get_sample_value(
            "grpc_server_started_total",
            {
                "grpc_type": "client_stream",
                "grpc_service": "tally.v1.MeteringService",
                "grpc_method": "StreamUsage",
            },
        )
        == 0.0
    )
    for outcome in metrics.HOLD_OUTCOMES:
        assert registry.get_sample_value("tally_holds_total", {"outcome": outcome}) == 0.0
    for entry_type in metrics.ENTRY_TYPES:
        assert registry.get_sample_value("tally_ledger_entries_total", {"type": entry_type}) == 0
    assert registry.get_sample_value("tally_auto_reload_intents_total", {"outcome": "failed"}) == 0
    info = [s for s in registry.collect() if s.name == "tally_build"]
    assert info and info[0].samples[0].labels["version"]


def test_two_registries_do_not_share_series() -> None:
    first, m1 = _fresh()
    second, _ = _fresh()
    m1.hold("created")
    assert _value(first, "tally_holds_total", outcome="created") == 1
    assert _value(second, "tally_holds_total", outcome="created") == 0


# -- derivations from responses ---------------------------------------------------------


def _observe(m: metrics.Metrics, method: str, response: Any) -> None:
    metrics._observe_response(m, method, response)


def test_record_usage_counts_events_credits_and_entries_but_not_duplicates() -> None:
    registry, m = _fresh()
    event = metering_pb2.UsageEvent(
        account_id="acct-secret",
        product_id="pan",
        status=metering_pb2.USAGE_STATUS_COMPLETED,
        credits="2.5",
    )
    first = metering_pb2.RecordUsageResponse(event=event, entry=_entry(ledger_pb2.ENTRY_TYPE_DEBIT))
    _observe(m, "RecordUsage", first)
    _observe(m, "RecordUsage", metering_pb2.RecordUsageResponse(event=event, duplicate=True))
    assert _value(registry, "tally_usage_events_total", product="pan", status="completed") == 1
    assert _value(registry, "tally_credits_consumed_total", product="pan") == 2.5
    assert _value(registry, "tally_ledger_entries_total", type="debit") == 1


def test_batch_rows_count_each_item_and_insufficient_credit_items() -> None:
    """A batch is counted from the rows tally_record_usage answers, as a stream's group:
    per (product, status) and per entry type, summed over the group."""
    registry, m = _fresh()
    rows: list[Any] = [
        [0, 0, False, 0, "purchased", "", None, None, None, None, "ocr", "failed"],
        [1, 1, False, 1_250_000, "purchased", "", 7, 3, 0, "", "ocr", "completed"],
        [2, 2, False, 250_000, "purchased", "", 8, 4, 0, "", "ocr", "completed"],
        [3, 1, True, 1_250_000, "purchased", "", 7, 3, 0, "", "ocr", "completed"],
        {"index": 4, "error": "INSUFFICIENT_CREDITS", "available": 0, "requested": 1},
        {"index": 5, "error": "ACCOUNT_NOT_FOUND"},
    ]
    metrics._observe_record_usage_rows(m, "RecordUsageBatch", rows)
    assert _value(registry, "tally_usage_events_total", product="ocr", status="failed") == 1
    assert _value(registry, "tally_usage_events_total", product="ocr", status="completed") == 2
    assert _value(registry, "tally_credits_consumed_total", product="ocr") == 1.5
    assert _value(registry, "tally_ledger_entries_total", type="debit") == 2
    assert (
        _value(registry, "tally_insufficient_credit_rejections_total", method="RecordUsageBatch")
        == 1
    )


def test_stream_usage_rows_are_counted_as_written() -> None:
    registry, m = _fresh()
    rows = [
        {
            "index": 0,
            "event": {"product_id": "pan", "status": "completed", "credits": 1_500_000},
            "entry": {"entry_type": "debit"},
            "duplicate": False,
        },
        {
            "index": 1,
            "event": {"product_id": "pan", "status": "completed", "credits": 1_500_000},
            "entry": {"entry_type": "debit"},
            "duplicate": True,
        },
        {"index": 2, "error": "INSUFFICIENT_CREDITS"},
        {"index": 3, "error": "PRODUCT_NOT_FOUND"},
    ]
    metrics._observe_record_usage_rows(m, "StreamUsage", rows)
    assert _value(registry, "tally_usage_events_total", product="pan", status="completed") == 1
    assert _value(registry, "tally_credits_consumed_total", product="pan") == 1.5
    assert _value(registry, "tally_ledger_entries_total", type="debit") == 1
    assert _value(registry, "tally_insufficient_credit_rejections_total", method="StreamUsage") == 1


def test_holds_and_entries_of_credit_rpcs() -> None:
    registry, m = _fresh()
    _observe(m, "Reserve", credits_pb2.ReserveResponse())
    _observe(
        m, "Capture", credits_pb2.CaptureResponse(entry=_entry(ledger_pb2.ENTRY_TYPE_DEBIT, "r1"))
    )
    _observe(m, "Release", credits_pb2.ReleaseResponse())
    _observe(m, "TopUp", credits_pb2.TopUpResponse(entry=_entry(ledger_pb2.ENTRY_TYPE_CREDIT)))
    _observe(
        m, "Adjust", credits_pb2.AdjustResponse(entry=_entry(ledger_pb2.ENTRY_TYPE_ADJUSTMENT))
    )
    _observe(m, "Debit", credits_pb2.DebitResponse(entry=_entry(ledger_pb2.ENTRY_TYPE_DEBIT)))
    assert _value(registry, "tally_holds_total", outcome="created") == 1
    assert _value(registry, "tally_holds_total", outcome="captured") == 1
    assert _value(registry, "tally_holds_total", outcome="released") == 1
    assert _value(registry, "tally_ledger_entries_total", type="debit") == 2
    assert _value(registry, "tally_ledger_entries_total", type="credit") == 1
    assert _value(registry, "tally_ledger_entries_total", type="adjustment") == 1


def test_long_jobs_start_capture_or_release_their_holds() -> None:
    registry, m = _fresh()
    started = metering_pb2.StartUsageResponse(
        event=metering_pb2.UsageEvent(product_id="pdf", status=metering_pb2.USAGE_STATUS_PENDING),
        reservation=credits_pb2.Reservation(reservation_id="r1"),
    )
    _observe(m, "StartUsage", started)
    done = metering_pb2.UsageEvent(
        product_id="pdf",
        status=metering_pb2.USAGE_STATUS_COMPLETED,
        credits="3",
        reservation_id="r1",
    )
    _observe(
        m,
        "CompleteUsage",
        metering_pb2.CompleteUsageResponse(
            event=done, entry=_entry(ledger_pb2.ENTRY_TYPE_DEBIT, "r1")
        ),
    )
    failed = metering_pb2.UsageEvent(
        product_id="pdf", status=metering_pb2.USAGE_STATUS_FAILED, credits="0", reservation_id="r2"
    )
    _observe(m, "FailUsage", metering_pb2.FailUsageResponse(event=failed))
    assert _value(registry, "tally_usage_jobs_started_total", product="pdf") == 1
    assert _value(registry, "tally_holds_total", outcome="created") == 1
    assert _value(registry, "tally_holds_total", outcome="captured") == 1
    assert _value(registry, "tally_holds_total", outcome="released") == 1
    assert _value(registry, "tally_usage_events_total", product="pdf", status="completed") == 1
    assert _value(registry, "tally_usage_events_total", product="pdf", status="failed") == 1
    assert _value(registry, "tally_credits_consumed_total", product="pdf") == 3


# -- the interceptor, in process --------------------------------------------------------


def _unary(behavior: Callable[..., Any], request: Any, response: Any) -> Any:
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


async def _debit(request: credits_pb2.DebitRequest, context: Any) -> credits_pb2.DebitResponse:
    if request.amount == "999":
        raise errors.InsufficientCredits("available credit 1 cannot cover 999")
    if request.amount == "boom":
        raise RuntimeError("a bug")
    # What Database.call reports: a replay of a stored response, or a first answer.
    metrics.note_call("tally_move", {}, request.request_id == "replayed")
    return credits_pb2.DebitResponse(entry=_entry(ledger_pb2.ENTRY_TYPE_DEBIT))


async def _stream_usage(
    requests: AsyncIterator[metering_pb2.StreamUsageRequest], context: Any
) -> metering_pb2.StreamUsageResponse:
    count = 0
    async for request in requests:
        rows = [
            {
                "index": count,
                "event": {
                    "product_id": request.event.product_id,
                    "status": "completed",
                    "credits": 250_000,
                },
                "duplicate": False,
            }
        ]
        metrics.note_call("tally_record_usage", rows, False)
        count += 1
    return metering_pb2.StreamUsageResponse(recorded=count)


async def _drive_interceptor(registry: CollectorRegistry, m: metrics.Metrics) -> None:
    server = grpc.aio.server(
        interceptors=[metrics.MetricsInterceptor(m), ErrorMappingInterceptor()]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "tally.v1.CreditsService",
                {"Debit": _unary(_debit, credits_pb2.DebitRequest, credits_pb2.DebitResponse)},
            ),
            grpc.method_handlers_generic_handler(
                "tally.v1.MeteringService",
                {
                    "StreamUsage": grpc.stream_unary_rpc_method_handler(
                        _stream_usage,
                        request_deserializer=metering_pb2.StreamUsageRequest.FromString,
                        response_serializer=metering_pb2.StreamUsageResponse.SerializeToString,
                    )
                },
            ),
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            debit = channel.unary_unary(
                "/tally.v1.CreditsService/Debit",
                request_serializer=credits_pb2.DebitRequest.SerializeToString,
                response_deserializer=credits_pb2.DebitResponse.FromString,
            )
            await debit(credits_pb2.DebitRequest(request_id="a", amount="1"), timeout=5)
            await debit(credits_pb2.DebitRequest(request_id="replayed", amount="1"), timeout=5)
            for amount, code in [
                ("999", grpc.StatusCode.FAILED_PRECONDITION),
                ("boom", grpc.StatusCode.INTERNAL),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await debit(credits_pb2.DebitRequest(request_id="b", amount=amount), timeout=5)
                assert caught.value.code() == code
            stream = channel.stream_unary(
                "/tally.v1.MeteringService/StreamUsage",
                request_serializer=metering_pb2.StreamUsageRequest.SerializeToString,
                response_deserializer=metering_pb2.StreamUsageResponse.FromString,
            )
            events = [
                metering_pb2.StreamUsageRequest(
                    event=metering_pb2.UsageEvent(product_id="pan", event_id=str(i))
                )
                for i in range(4)
            ]
            reply = await stream(iter(events), timeout=5)
            assert reply.recorded == 4
    finally:
        await server.stop(None)


def test_interceptor_records_the_final_code_and_the_domain_error() -> None:
    registry, m = _fresh()
    asyncio.run(_drive_interceptor(registry, m))
    rpc = {"grpc_type": "unary", "grpc_service": "tally.v1.CreditsService", "grpc_method": "Debit"}
    assert _value(registry, "grpc_server_started_total", **rpc) == 4
    assert _value(registry, "grpc_server_handled_total", **rpc, grpc_code="OK") == 2
    assert _value(registry, "grpc_server_handled_total", **rpc, grpc_code="FailedPrecondition") == 1
    assert _value(registry, "grpc_server_handled_total", **rpc, grpc_code="Internal") == 1
    assert _value(registry, "grpc_server_handling_seconds_count", **rpc) == 4
    # The replayed response is not a second entry; the refusal is counted by method.
    assert _value(registry, "tally_ledger_entries_total", type="debit") == 1
    assert _value(registry, "tally_insufficient_credit_rejections_total", method="Debit") == 1
    stream = {
        "grpc_type": "client_stream",
        "grpc_service": "tally.v1.MeteringService",
        "grpc_method": "StreamUsage",
    }
    assert _value(registry, "grpc_server_handled_total", **stream, grpc_code="OK") == 1
    assert _value(registry, "tally_usage_events_total", product="pan", status="completed") == 4
    assert _value(registry, "tally_credits_consumed_total", product="pan") == 1.0


# -- the database -----------------------------------------------------------------------


async def _drive_pool(database_url: str, registry: CollectorRegistry, m: metrics.Metrics) -> None:
    engine = make_engine(database_url, pool_size=1)
    m.watch_engine(engine)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            assert _value(registry, "tally_db_pool_connections", state="in_use") == 1
            assert _value(registry, "tally_db_pool_size") == 1

            async def second() -> None:
                async with engine.connect() as other:
                    await other.execute(text("SELECT 2"))

            waiter = asyncio.create_task(second())
            for _ in range(100):
                if _value(registry, "tally_db_pool_waiting") == 1:
                    break
                await asyncio.sleep(0.01)
            assert _value(registry, "tally_db_pool_waiting") == 1
        await asyncio.wait_for(waiter, 10)
        assert _value(registry, "tally_db_pool_waiting") == 0
        assert _value(registry, "tally_db_pool_connections", state="in_use") == 0
        assert _value(registry, "tally_db_pool_connections", state="idle") == 1
        with pytest.raises(Exception, match="division by zero"):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1 / 0"))
    finally:
        await engine.dispose()
    # Failed statements are timed too.
    assert _value(registry, "tally_db_query_seconds_count") >= 3


def test_pool_gauges_and_query_timings_on_a_real_engine(database_url: str) -> None:
    registry, m = _fresh()
    asyncio.run(_drive_pool(database_url, registry, m))


# -- /metrics of a real server ----------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_database_url(database_url: str) -> str:
    """A database of its own: no other server's sweeper writes down this module's holds."""
    name = f"tally_test_metrics_{uuid.uuid4().hex[:8]}"
    asyncio.run(_create_database(database_url, name))
    url = _with_database(database_url, name)
    migrate(url)
    return url


@pytest.fixture(scope="module")
def metrics_server(
    metrics_database_url: str, server_log_dir: Path
) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    process = start_server(
        metrics_database_url,
        server_log_dir,
        extra_env={"TALLY_METRICS_ADDRESS": f"127.0.0.1:{port}"},
    )
    yield process, port
    process.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body: bytes = reply.read()
        assert reply.headers["Content-Type"].startswith("text/plain")
    return body.decode()


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _get(after, name, **labels) - _get(before, name, **labels)


def _label_values(samples: Samples) -> set[str]:
    return {value for (_, labels) in samples for (_, value) in labels}


def _rpc(service: str, method: str) -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": f"tally.v1.{service}", "grpc_method": method}


def test_metrics_of_money_rpcs_over_http(metrics_server: tuple[ServerProcess, int]) -> None:
    server, port = metrics_server
    account = f"acct-{uuid.uuid4().hex[:16]}"
    before = _parse(scrape(port))
    with TallyClient(server.target, timeout_seconds=10) as client:
        client.create_account(account)
        top_up_key = f"topup-{uuid.uuid4().hex}"
        client.top_up(account, "10", request_id=top_up_key)
        client.top_up(account, "10", request_id=top_up_key)  # a retry: replayed
        hold = client.reserve(account, "4")
        client.capture(hold.reservation_id, "3")
        other = client.reserve(account, "2")
        client.release(other.reservation_id)
        with pytest.raises(InsufficientCredits):
            client.debit(account, "100")
    top_up = _rpc("CreditsService", "TopUp")
    debit = _rpc("CreditsService", "Debit")
    # The server counts a call when its handler returns, which may be just after the
    # client has its answer: scrape until the last call is counted.
    deadline = time.monotonic() + 10
    while True:
        after = _parse(scrape(port))
        last = _delta(before, after, "grpc_server_handled_total", **debit)
        if last >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def delta(name: str, **labels: str) -> float:
        return _delta(before, after, name, **labels)

    assert delta("grpc_server_started_total", **top_up) == 2
    assert delta("grpc_server_handled_total", **top_up, grpc_code="OK") == 2
    assert delta("grpc_server_handling_seconds_count", **top_up) == 2
    assert delta("grpc_server_handled_total", **debit, grpc_code="FailedPrecondition") == 1
    assert delta("tally_insufficient_credit_rejections_total", method="Debit") == 1
    assert delta("tally_ledger_entries_total", type="credit") == 1
    assert delta("tally_ledger_entries_total", type="debit") == 1
    assert delta("tally_holds_total", outcome="created") == 2
    assert delta("tally_holds_total", outcome="captured") == 1
    assert delta("tally_holds_total", outcome="released") == 1
    assert delta("tally_db_query_seconds_count") >= 7
    assert _get(after, "tally_db_up") == 1
    assert _get(after, "tally_db_pool_size") == 10
    assert [v for (name, _), v in after.items() if name == "tally_build_info"] == [1]
    assert account not in _label_values(after)
    assert not any(account in value for value in _label_values(after))


def test_metrics_of_usage_over_http(metrics_server: tuple[ServerProcess, int]) -> None:
    server, port = metrics_server
    account = f"acct-{uuid.uuid4().hex[:16]}"
    poor = f"acct-{uuid.uuid4().hex[:16]}"
    product = "metrics-pan"
    before = _parse(scrape(port))
    with TallyClient(server.target, timeout_seconds=10) as client:
        client.upsert_product(product, "0.5")
        client.create_account(account)
        client.create_account(poor)
        client.top_up(account, "100")
        first = client.record_usage(account, "ev-1", product, quantity=2)
        again = client.record_usage(account, "ev-1", product, quantity=2)
        assert not first.duplicate and again.duplicate
        batch = client.record_usage_batch(
            [
                client.usage_event(account, "ev-2", product, quantity=1),
                client.usage_event(poor, "ev-3", product, quantity=1),
            ]
        )
        assert batch.results[0].HasField("result") and not batch.results[1].HasField("result")
        streamed = client.stream_usage(
            [client.usage_event(account, f"st-{i}", product, quantity=1) for i in range(3)]
            + [client.usage_event(account, "ev-2", product, quantity=1)]
        )
        assert (streamed.recorded, streamed.duplicates) == (3, 1)
        client.start_usage(account, "job-1", product, quantity=4)
        client.complete_usage(account, "job-1", quantity=3)
        client.start_usage(account, "job-2", product, quantity=4)
        client.fail_usage(account, "job-2")
    after = _parse(scrape(port))

    def delta(name: str, **labels: str) -> float:
        return _delta(before, after, name, **labels)

    # ev-1, ev-2, st-0..2, job-1 completed; job-2 failed.
    assert delta("tally_usage_events_total", product=product, status="completed") == 6
    assert delta("tally_usage_events_total", product=product, status="failed") == 1
    assert delta("tally_usage_jobs_started_total", product=product) == 2
    # 2 x 0.5 + 0.5 + 3 x 0.5 + 3 x 0.5
    assert delta("tally_credits_consumed_total", product=product) == pytest.approx(4.5)
    assert delta("tally_ledger_entries_total", type="debit") == 6
    assert delta("tally_ledger_entries_total", type="credit") == 1
    assert delta("tally_holds_total", outcome="created") == 2
    assert delta("tally_holds_total", outcome="captured") == 1
    assert delta("tally_holds_total", outcome="released") == 1
    assert delta("tally_insufficient_credit_rejections_total", method="RecordUsageBatch") == 1
    values = _label_values(after)
    assert account not in values and poor not in values


def test_expired_holds_are_counted_by_the_sweeper(
    metrics_server: tuple[ServerProcess, int],
) -> None:
    server, port = metrics_server
    account = f"acct-{uuid.uuid4().hex[:16]}"
    before = _get(_parse(scrape(port)), "tally_holds_total", outcome="expired")
    with TallyClient(server.target, timeout_seconds=10) as client:
        client.create_account(account)
        client.top_up(account, "10")
        client.reserve(account, "1", ttl_seconds=1)
        client.reserve(account, "1", ttl_seconds=1)
    deadline = time.monotonic() + 15
    expired = before
    while time.monotonic() < deadline:
        expired = _get(_parse(scrape(port)), "tally_holds_total", outcome="expired")
        if expired - before >= 2:
            break
        time.sleep(0.2)
    assert expired - before == 2


def test_a_metrics_address_that_is_taken_stops_the_start(
    database_url: str, server_log_dir: Path
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(RuntimeError, match=r"cannot listen on .* \(TALLY_METRICS_ADDRESS\)"):
            start_server(database_url, server_log_dir, extra_env={"TALLY_METRICS_ADDRESS": address})


def test_empty_metrics_address_disables_the_endpoint(
    database_url: str, server_log_dir: Path
) -> None:
    process = start_server(database_url, server_log_dir, extra_env={"TALLY_METRICS_ADDRESS": ""})
    try:
        assert "metrics on" not in process.log()
    finally:
        process.stop()


def test_the_workers_report_their_last_success(metrics_server: tuple[ServerProcess, int]) -> None:
    _, port = metrics_server
    deadline = time.monotonic() + 20
    names = (
        "tally_sweeper_last_success_timestamp_seconds",
        "tally_reload_worker_last_success_timestamp_seconds",
    )
    while True:
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(scrape(port))
            for s in family.samples
            if s.name in names
        }
        if all(samples.get(name, 0) > 0 for name in names) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for name in names:
        assert abs(samples[name] - time.time()) < 60, (name, samples)
