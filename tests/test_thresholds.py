"""Threshold alerts: one notification per crossing, recorded in the crossing's
transaction, delivered at least once with a stable id.

The NotificationService is the caller's, outside Tally, so it is implemented here as
a real gRPC server on loopback; everything else is real (PostgreSQL, server
processes, two replicas on one database).
"""

import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest

from tally.v1 import credits_pb2 as c
from tally.v1 import notification_pb2, notification_pb2_grpc
from tally_client import (
    AsyncTallyClient,
    NotificationNotFound,
    TallyClient,
    ThresholdNotFound,
    TooManyThresholds,
    usage_event,
)
from tests.conftest import ServerProcess, free_port, start_server
from tests.support import assert_consistent
from tests.test_races import run_on_both


class Receiver(notification_pb2_grpc.NotificationServiceServicer):
    """The caller's notification endpoint: records every attempt; fails on demand."""

    def __init__(self) -> None:
        self.calls: list[notification_pb2.NotifyRequest] = []
        self.failures_left = 0
        self.lock = threading.Lock()
        self.stall = threading.Event()
        self.stalled = threading.Event()
        self.stall.set()

    def Notify(
        self, request: notification_pb2.NotifyRequest, context: Any
    ) -> notification_pb2.NotifyResponse:
        with self.lock:
            self.calls.append(request)
            if self.failures_left > 0:
                self.failures_left -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "pager offline")
        if not self.stall.is_set():
            self.stalled.set()
            self.stall.wait(30)
        return notification_pb2.NotifyResponse()

    def ids(self) -> list[str]:
        with self.lock:
            return [r.notification_id for r in self.calls]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    backend = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    notification_pb2_grpc.add_NotificationServiceServicer_to_server(backend, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield backend, f"127.0.0.1:{port}"
    backend.stall.set()
    server.stop(None)


def notify_env(target: str) -> dict[str, str]:
    return {
        "TALLY_NOTIFY_TARGET": target,
        "TALLY_NOTIFY_BACKOFF_SECONDS": "0.2",
        "TALLY_NOTIFY_LEASE_SECONDS": "2",
    }


def create_threshold(
    client: TallyClient, account_id: str, request_id: str | None = None, **spec: Any
) -> c.Threshold:
    response = client.stubs.credits.CreateThreshold(
        c.CreateThresholdRequest(
            request_id=request_id or str(uuid.uuid4()),
            account_id=account_id,
            threshold=c.Threshold(**spec),
        ),
        timeout=10,
    )
    created: c.Threshold = response.threshold
    return created


def notifications(client: TallyClient, account_id: str) -> list[c.Notification]:
    return list(
        client.stubs.credits.ListNotifications(
            c.ListNotificationsRequest(account_id=account_id), timeout=10
        ).notifications
    )


def wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def delivered(client: TallyClient, account_id: str, count: int) -> bool:
    found = notifications(client, account_id)
    return len(found) == count and all(n.status == c.NOTIFICATION_STATUS_DELIVERED for n in found)


def test_concurrent_debits_on_two_replicas_notify_once_per_crossing(
    own_database_url: str, server_log_dir: Path, receiver: tuple[Receiver, str]
) -> None:
    backend, target = receiver
    replicas = (
        start_server(own_database_url, server_log_dir, notify_env(target)),
        start_server(own_database_url, server_log_dir, notify_env(target)),
    )
    try:
        with TallyClient(replicas[0].target) as client:
            account_id = f"alert-{uuid.uuid4().hex[:8]}"
            client.create_account(account_id)
            client.top_up(account_id, "100")
            threshold = create_threshold(
                client, account_id, metric=c.THRESHOLD_METRIC_AVAILABLE_CREDIT, value="50"
            )
            assert notifications(client, account_id) == []

            def debit(x: AsyncTallyClient) -> Any:
                return x.debit(account_id, "2")

            # 40 debits of 2 on two replicas at once: 100 -> 20 crosses 50 once.
            results = run_on_both(replicas, [debit] * 40)
            assert not [r for r in results if isinstance(r, BaseException)]
            assert client.get_balance(account_id).available == "20"
            wait_for(lambda: delivered(client, account_id, 1))
            (first,) = notifications(client, account_id)
            assert (first.threshold_id, first.metric, first.threshold) == (
                threshold.threshold_id,
                c.THRESHOLD_METRIC_AVAILABLE_CREDIT,
                "50",
            )
            assert first.observed in {f"{v}" for v in range(20, 50)}
            # Staying below never fires again.
            results = run_on_both(replicas, [debit] * 4)
            assert not [r for r in results if isinstance(r, BaseException)]
            # Back above, then below again: a second crossing, a second notification.
            client.top_up(account_id, "60")  # 12 -> 72
            results = run_on_both(replicas, [debit] * 20)  # 72 -> 32
            assert not [r for r in results if isinstance(r, BaseException)]
            wait_for(lambda: delivered(client, account_id, 2))
            second, again = notifications(client, account_id)
            assert again.notification_id == first.notification_id
            assert second.notification_id != first.notification_id
            # Delivered at least once each; nothing else was sent.
            assert set(backend.ids()) == {first.notification_id, second.notification_id}
            assert_consistent(client, account_id)
    finally:
        for replica in replicas:
            replica.stop()


def test_failed_delivery_is_retried_with_the_same_id(
    own_database_url: str, server_log_dir: Path, receiver: tuple[Receiver, str]
) -> None:
    backend, target = receiver
    backend.failures_left = 2
    metrics_address = f"127.0.0.1:{free_port()}"
    env = notify_env(target) | {"TALLY_METRICS_ADDRESS": metrics_address}
    replica = start_server(own_database_url, server_log_dir, env)
    try:
        with TallyClient(replica.target) as client:
            account_id = f"retry-{uuid.uuid4().hex[:8]}"
            client.create_account(account_id)
            client.top_up(account_id, "30")
            create_threshold(
                client, account_id, metric=c.THRESHOLD_METRIC_AVAILABLE_CREDIT, value="10"
            )
            client.reserve(account_id, "25")  # available 30 -> 5: a hold crosses too
            wait_for(lambda: delivered(client, account_id, 1))
            (sent,) = notifications(client, account_id)
            assert (sent.attempts, sent.error, sent.observed) == (3, "", "5")
            assert backend.ids() == [sent.notification_id] * 3
            (request,) = {r.SerializeToString(deterministic=True) for r in backend.calls}
            received = notification_pb2.NotifyRequest.FromString(request)
            assert (received.account_id, received.kind, received.threshold) == (
                account_id,
                c.THRESHOLD_METRIC_AVAILABLE_CREDIT,
                "10",
            )
            with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as r:
                scraped = r.read().decode()
            assert 'tally_notifications_total{outcome="retry"} 2.0' in scraped
            assert 'tally_notifications_total{outcome="delivered"} 1.0' in scraped
    finally:
        replica.stop()


def test_crash_while_delivering_delivers_again_with_the_same_id(
    own_database_url: str, server_log_dir: Path, receiver: tuple[Receiver, str]
) -> None:
    backend, target = receiver
    backend.stall.clear()  # the first delivery hangs
    env = notify_env(target)
    replica = start_server(own_database_url, server_log_dir, env)
    account_id = f"crash-{uuid.uuid4().hex[:8]}"
    with TallyClient(replica.target) as client:
        client.create_account(account_id)
        client.top_up(account_id, "5")
        create_threshold(client, account_id, metric=c.THRESHOLD_METRIC_AVAILABLE_CREDIT, value="3")
        client.debit(account_id, "4")
    assert backend.stalled.wait(20)
    replica.stop(signal.SIGKILL)  # dies holding the claim, before recording anything
    backend.stall.set()
    restarted = start_server(own_database_url, server_log_dir, env)
    try:
        with TallyClient(restarted.target) as client:
            wait_for(lambda: delivered(client, account_id, 1), seconds=30)
            (sent,) = notifications(client, account_id)
            assert sent.attempts >= 2
            assert set(backend.ids()) == {sent.notification_id} and len(backend.ids()) >= 2
    finally:
        restarted.stop()


def test_usage_quota_fires_once_per_period(client: TallyClient, funded: str) -> None:
    product_id = f"p-{uuid.uuid4().hex[:8]}"
    client.upsert_product(product_id, "1")
    requests = client.create_threshold(
        funded, metric="usage_requests", value=10, percent=80, period="month"
    )
    assert (requests.fire_at, requests.percent) == ("8", 80)
    spent = create_threshold(
        client,
        funded,
        metric=c.THRESHOLD_METRIC_USAGE_CREDITS,
        value="9.5",
        period=c.THRESHOLD_PERIOD_DAY,
    )
    for i in range(7):
        client.record_usage(funded, f"e-{i}", product_id)
    assert notifications(client, funded) == []
    client.record_usage(funded, "e-7", product_id)  # the 8th request: 80% of 10
    (at_80,) = notifications(client, funded)
    assert (at_80.threshold_id, at_80.observed, at_80.threshold) == (
        requests.threshold_id,
        "8",
        "8",
    )
    assert at_80.HasField("period_start")
    # No target is configured on this server: recorded and listed, not delivered.
    assert (at_80.status, at_80.attempts) == (c.NOTIFICATION_STATUS_PENDING, 0)
    client.record_usage(funded, "e-8", product_id)
    client.record_usage(funded, "e-8", product_id)  # a replay counts nothing
    assert len(notifications(client, funded)) == 1
    client.record_usage(funded, "e-9", product_id)  # 10 credits today: crosses 9.5
    latest = notifications(client, funded)
    assert [n.threshold_id for n in latest] == [spent.threshold_id, requests.threshold_id]
    assert latest[0].observed == "10"
    for i in range(10, 13):
        client.record_usage(funded, f"e-{i}", product_id)
    assert len(notifications(client, funded)) == 2
    # Created when the period's usage is already past it: fires at once.
    late = create_threshold(
        client,
        funded,
        metric=c.THRESHOLD_METRIC_USAGE_REQUESTS,
        value="5",
        period=c.THRESHOLD_PERIOD_DAY,
    )
    assert notifications(client, funded)[0].threshold_id == late.threshold_id
    assert_consistent(client, funded)


def test_create_list_delete_are_idempotent(client: TallyClient, funded: str) -> None:
    key = f"th-{uuid.uuid4().hex}"
    first = create_threshold(
        client, funded, key, metric=c.THRESHOLD_METRIC_AVAILABLE_CREDIT, value="-5"
    )
    again = create_threshold(
        client, funded, key, metric=c.THRESHOLD_METRIC_AVAILABLE_CREDIT, value="-5"
    )
    assert again == first and first.value == "-5"
    with pytest.raises(grpc.RpcError) as reused:
        create_threshold(client, funded, key, metric=c.THRESHOLD_METRIC_AVAILABLE_CREDIT, value="1")
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Already below when created: one notification at once.
    below = create_threshold(
        client, funded, metric=c.THRESHOLD_METRIC_AVAILABLE_CREDIT, value="1000"
    )
    (fired,) = notifications(client, funded)
    assert (fired.threshold_id, fired.observed) == (below.threshold_id, "100")
    assert [n.notification_id for n in client.list_notifications(funded).notifications] == [
        fired.notification_id
    ]
    # Pages of one, newest first.
    page = client.stubs.credits.ListThresholds(
        c.ListThresholdsRequest(account_id=funded, page_size=1), timeout=10
    )
    rest = client.stubs.credits.ListThresholds(
        c.ListThresholdsRequest(account_id=funded, page_token=page.next_page_token), timeout=10
    )
    assert [t.threshold_id for t in [*page.thresholds, *rest.thresholds]] == [
        below.threshold_id,
        first.threshold_id,
    ]
    assert rest.next_page_token == ""
    # Delete: a retry with the key replays; another delete is NOT_FOUND.
    delete = c.DeleteThresholdRequest(
        request_id=str(uuid.uuid4()), account_id=funded, threshold_id=below.threshold_id
    )
    deleted = client.stubs.credits.DeleteThreshold(delete, timeout=10).threshold
    assert deleted.HasField("delete_time")
    assert client.stubs.credits.DeleteThreshold(delete, timeout=10).threshold == deleted
    with pytest.raises(grpc.RpcError) as gone:
        delete.request_id = str(uuid.uuid4())
        client.stubs.credits.DeleteThreshold(delete, timeout=10)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # Get answers live and deleted thresholds, and notifications as listed.
    assert client.get_threshold(below.threshold_id) == deleted
    assert client.get_threshold(first.threshold_id.upper()) == first
    assert client.get_notification(fired.notification_id) == fired
    with pytest.raises(ThresholdNotFound):
        client.get_threshold(str(uuid.uuid4()))
    with pytest.raises(NotificationNotFound):
        client.get_notification(str(uuid.uuid4()))
    listed = client.stubs.credits.ListThresholds(
        c.ListThresholdsRequest(account_id=funded), timeout=10
    ).thresholds
    assert [t.threshold_id for t in listed] == [first.threshold_id]
    # A deleted threshold fires no more.
    client.top_up(funded, "1000")
    client.debit(funded, "1000")
    assert len(notifications(client, funded)) == 1
    # Bad specifications name their field.
    bad_specs: list[tuple[dict[str, Any], str]] = [
        ({"value": "1"}, "threshold.metric"),
        ({"metric": c.THRESHOLD_METRIC_USAGE_REQUESTS, "value": "5"}, "threshold.period"),
        (
            {
                "metric": c.THRESHOLD_METRIC_USAGE_REQUESTS,
                "value": "1.5",
                "period": c.THRESHOLD_PERIOD_DAY,
            },
            "threshold.value",
        ),
        (
            {"metric": c.THRESHOLD_METRIC_AVAILABLE_CREDIT, "value": "1", "percent": 80},
            "threshold.percent",
        ),
    ]
    for spec, field in bad_specs:
        with pytest.raises(grpc.RpcError) as bad:
            create_threshold(client, funded, **spec)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(bad.value.details()) or field in str(bad.value.trailing_metadata())
    assert_consistent(client, funded)


def test_concurrent_usage_groups_on_two_replicas_cross_once(
    client: TallyClient, funded: str, server: ServerProcess, second_server: ServerProcess
) -> None:
    product_id = f"p-{uuid.uuid4().hex[:8]}"
    client.upsert_product(product_id, "1")
    quota = create_threshold(
        client,
        funded,
        metric=c.THRESHOLD_METRIC_USAGE_REQUESTS,
        value="50",
        period=c.THRESHOLD_PERIOD_MONTH,
    )
    low = create_threshold(client, funded, metric=c.THRESHOLD_METRIC_AVAILABLE_CREDIT, value="60")

    def batch(n: int) -> Callable[[AsyncTallyClient], Any]:
        events = [
            usage_event(funded, f"g{n}-{i}", product_id, endpoint=f"/e{i % 2}") for i in range(5)
        ]
        return lambda x: x.record_usage_batch(events)

    # Ten groups of five (two rollup rows each) at once on two replicas: 50 requests,
    # available 100 -> 50; each threshold is crossed by exactly one group.
    results = run_on_both((server, second_server), [batch(n) for n in range(10)])
    assert not [r for r in results if isinstance(r, BaseException)]
    assert all(not r.status.code for response in results for r in response.results)
    assert client.get_balance(funded).available == "50"
    found = notifications(client, funded)
    assert sorted(n.threshold_id for n in found) == sorted([quota.threshold_id, low.threshold_id])
    (usage,) = [n for n in found if n.threshold_id == quota.threshold_id]
    assert usage.observed == "50"
    assert_consistent(client, funded)


def test_usage_periods_are_the_account_s_days(client: TallyClient, account_id: str) -> None:
    zone = "Pacific/Kiritimati"  # UTC+14: its day is rarely the UTC day
    client.create_account(account_id, time_zone=zone)
    client.top_up(account_id, "10")
    product_id = f"p-{uuid.uuid4().hex[:8]}"
    client.upsert_product(product_id, "1")
    create_threshold(
        client,
        account_id,
        metric=c.THRESHOLD_METRIC_USAGE_CREDITS,
        value="2",
        period=c.THRESHOLD_PERIOD_DAY,
    )
    # An event backdated to yesterday (local) counts nothing towards today.
    now = datetime.now(ZoneInfo(zone))
    yesterday = now - timedelta(days=1)
    client.record_usage(
        account_id, "old", product_id, start_time=yesterday, complete_time=yesterday
    )
    client.record_usage(account_id, "a", product_id)
    assert notifications(client, account_id) == []
    client.record_usage(account_id, "b", product_id)
    (fired,) = notifications(client, account_id)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    assert fired.period_start.ToDatetime(tzinfo=UTC) == midnight.astimezone(UTC)
    assert fired.observed == "2"


def test_an_expiry_crosses_too(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    client.top_up(account_id, "20")
    client.top_up(account_id, "30", expire_time=datetime.now(UTC) + timedelta(seconds=2))
    create_threshold(client, account_id, metric=c.THRESHOLD_METRIC_AVAILABLE_CREDIT, value="25")
    assert notifications(client, account_id) == []
    # The grant's write-off (by the sweeper, or the catch-up of a read) takes 50 to 20.
    wait_for(lambda: len(notifications(client, account_id)) == 1)
    (expired,) = notifications(client, account_id)
    assert expired.observed == "20"
    assert client.get_balance(account_id).available == "20"
    assert len(notifications(client, account_id)) == 1
    assert_consistent(client, account_id)


def test_live_thresholds_are_bounded(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id)
    created = [
        client.create_threshold(account_id, metric="available_credit", value=-i) for i in range(100)
    ]
    with pytest.raises(TooManyThresholds) as info:
        client.create_threshold(account_id, metric="available_credit", value=-100)
    assert info.value.metadata == {"account_id": account_id, "limit": "100"}
    client.delete_threshold(account_id, created[0].threshold_id)
    client.create_threshold(account_id, metric="available_credit", value=-100)
