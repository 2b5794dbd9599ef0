"""One UsageRange message for the range of GetUsage, ListUsageEvents and
ExportUsageReport, read by one server function (ranges.given)."""

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from tally.v1 import metering_pb2
from tally_client import InvalidArgument, TallyClient
from tally_client import _requests as rq


def test_the_three_requests_share_usage_range() -> None:
    for request in (
        metering_pb2.GetUsageRequest,
        metering_pb2.ListUsageEventsRequest,
        metering_pb2.ExportUsageReportRequest,
    ):
        fields = request.DESCRIPTOR.fields_by_name
        assert fields["time_range"].message_type is metering_pb2.UsageRange.DESCRIPTOR
        assert not {"preset", "start_time", "end_time"} & set(fields), request.__name__


def test_client_builds_one_range() -> None:
    with pytest.raises(ValueError):
        rq.usage_range("today", start_time=datetime.now(UTC))
    r = rq.usage_range("Last 7 days")
    assert r.preset == metering_pb2.RANGE_PRESET_LAST_7_DAYS
    assert not r.HasField("start_time")
    request = rq.list_usage_events("a", preset="today").request
    assert request.time_range.preset == metering_pb2.RANGE_PRESET_TODAY  # type: ignore[attr-defined]


def test_list_usage_events_takes_a_preset(client: TallyClient, funded: str) -> None:
    product_id = f"prod-{uuid.uuid4().hex[:12]}"
    client.upsert_product(product_id, "1")
    for i in range(3):
        client.record_usage(funded, f"txn-{i}", product_id)
    today = list(client.iter_usage_events(funded, preset="today", page_size=2))
    assert [e.event_id for e in today] == ["txn-2", "txn-1", "txn-0"]
    assert client.list_usage_events(funded, preset="yesterday").events == []
    assert client.get_usage(funded, preset="today").totals.total_requests == 3


def test_preset_with_bounds_is_invalid(client: TallyClient, funded: str) -> None:
    request = metering_pb2.ListUsageEventsRequest(
        account_id=funded,
        time_range=metering_pb2.UsageRange(preset=metering_pb2.RANGE_PRESET_TODAY),
    )
    request.time_range.end_time.GetCurrentTime()
    with pytest.raises(grpc.RpcError) as info:
        client.stubs.metering.ListUsageEvents(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "time_range.preset" in (info.value.details() or "")
    unknown = metering_pb2.GetUsageRequest(
        account_id=funded,
        time_range=metering_pb2.UsageRange(preset=99),  # type: ignore[arg-type]
    )
    with pytest.raises(grpc.RpcError) as info:
        client.stubs.metering.GetUsage(unknown, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "time_range.preset" in (info.value.details() or "")
    with pytest.raises(InvalidArgument) as reversed_bounds:
        client.list_usage_events(
            funded, start_time=datetime.now(UTC), end_time=datetime.now(UTC) - timedelta(days=1)
        )
    assert reversed_bounds.value.field_violations[0][0] == "time_range.start_time"
