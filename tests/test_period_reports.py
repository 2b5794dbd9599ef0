"""Period reports (GetPeriodReport): version 1 frozen on first request, a new version for
every transaction that changes a reported period, old versions as they stood, and
concurrency across two replicas."""

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import grpc
import pytest

from tally.v1 import metering_pb2 as m
from tally.v1 import metering_pb2_grpc
from tally_client import (
    InvalidArgument,
    PeriodNotClosed,
    ReportVersionNotFound,
    TallyClient,
)
from tally_client.cli import main as tallyctl
from tests.conftest import ServerProcess
from tests.test_metering import call, event, product, record, ts
from tests.test_metering_races import fire

Stub = metering_pb2_grpc.MeteringServiceStub


@pytest.fixture(scope="module")
def metering(client: TallyClient) -> Stub:
    return metering_pb2_grpc.MeteringServiceStub(client.channel)


@pytest.fixture
def replicas(
    server: ServerProcess, second_server: ServerProcess
) -> tuple[ServerProcess, ServerProcess]:
    return server, second_server


def account(client: TallyClient, time_zone: str = "UTC") -> str:
    account_id = f"acct-{uuid.uuid4().hex[:16]}"
    client.create_account(account_id, time_zone=time_zone)
    client.top_up(account_id, "1000")
    return account_id


def local_day(days_ago: int, zone: str = "UTC") -> date:
    return datetime.now(ZoneInfo(zone)).date() - timedelta(days=days_ago)


def at(day: date, hour: int, zone: str = "UTC", minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZoneInfo(zone))


def last_month() -> date:
    """A day of the previous (closed) month whose noon lies inside the backdating window."""
    first = datetime.now(UTC).date().replace(day=1)
    return first - timedelta(days=1)


def report(
    metering: Stub, account_id: str, day: date, *, daily: bool = True, version: int = 0
) -> m.PeriodReport:
    response: m.GetPeriodReportResponse = call(
        metering.GetPeriodReport,
        m.GetPeriodReportRequest(
            account_id=account_id,
            period=m.USAGE_PERIOD_DAILY if daily else m.USAGE_PERIOD_MONTHLY,
            year=day.year,
            month=day.month,
            day=day.day if daily else 0,
            version=version,
        ),
    )
    return response.report


def lines(r: m.PeriodReport) -> dict[tuple[str, str], tuple[int, int, int, str, int]]:
    return {
        (x.product_id, x.endpoint): (
            x.total_requests,
            x.successful_requests,
            x.failed_requests,
            x.credits_consumed,
            x.quantity,
        )
        for x in r.lines
    }


def changes(r: m.PeriodReport) -> dict[tuple[str, str], tuple[int, int, int, str, int]]:
    return {
        (x.product_id, x.endpoint): (
            x.total_requests,
            x.successful_requests,
            x.failed_requests,
            x.credits_consumed,
            x.quantity,
        )
        for x in r.changes
    }


def live_totals(metering: Stub, r: m.PeriodReport) -> m.UsageTotals:
    """GetUsage over the report's period, now."""
    usage: m.GetUsageResponse = call(
        metering.GetUsage,
        m.GetUsageRequest(
            account_id=r.account_id,
            period=r.period,
            time_range=m.UsageRange(start_time=r.totals.period_start, end_time=r.totals.period_end),
        ),
    )
    return usage.totals


def same_totals(a: m.UsageTotals, b: m.UsageTotals) -> bool:
    return (
        a.total_requests,
        a.successful_requests,
        a.failed_requests,
        Decimal(a.credits_consumed),
        a.quantity,
    ) == (
        b.total_requests,
        b.successful_requests,
        b.failed_requests,
        Decimal(b.credits_consumed),
        b.quantity,
    )


def test_version_1_is_frozen_on_first_request(client: TallyClient, metering: Stub) -> None:
    acct = account(client)
    pan = product(metering, "2.5")
    day = last_month()
    record(metering, event(acct, pan, endpoint="/a", start_time=ts(at(day, 10))))
    record(metering, event(acct, pan, endpoint="/a", start_time=ts(at(day, 11)), quantity=2))
    record(
        metering,
        event(acct, pan, endpoint="/b", status=m.USAGE_STATUS_FAILED, start_time=ts(at(day, 12))),
    )
    # Not in the period: this month.
    record(metering, event(acct, pan, endpoint="/a"))
    r = report(metering, acct, day, daily=False)
    assert (r.version, r.latest_version) == (1, 1)
    assert r.period == m.USAGE_PERIOD_MONTHLY and r.time_zone == "UTC"
    assert lines(r) == {(pan, "/a"): (2, 2, 0, "7.5", 3), (pan, "/b"): (1, 0, 1, "0", 1)}
    assert not r.changes
    assert r.totals.total_requests == 3 and r.totals.credits_consumed == "7.5"
    assert r.totals.period_start.ToDatetime(UTC) == datetime(day.year, day.month, 1, tzinfo=UTC)
    assert r.totals.period_end.ToDatetime(UTC) == datetime.now(UTC).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    assert same_totals(r.totals, live_totals(metering, r))
    # Asked again: the same version 1, not a new one.
    again = report(metering, acct, day, daily=False)
    assert again == r
    # The client library.
    assert client.get_period_report(acct, day.year, day.month, period="monthly") == r


def test_backdated_event_makes_version_2_and_version_1_stays(
    client: TallyClient, metering: Stub
) -> None:
    acct = account(client, "Asia/Kolkata")
    zone = "Asia/Kolkata"
    pan, ocr = product(metering, "1"), product(metering, "0.25")
    day = local_day(2, zone)
    record(metering, event(acct, pan, endpoint="/x", start_time=ts(at(day, 0, zone, 5))))
    v1 = report(metering, acct, day)
    assert lines(v1) == {(pan, "/x"): (1, 1, 0, "1", 1)}
    assert v1.totals.period_start.ToDatetime(UTC) == at(day, 0, zone)
    # Late events: one more of a known line, one of a new line, in two buckets; and one
    # just outside the day (the next local day), which changes nothing.
    late = event(acct, pan, endpoint="/x", start_time=ts(at(day, 23, zone, 50)), quantity=3)
    record(metering, late)
    v2 = report(metering, acct, day)
    assert (v2.version, v2.latest_version) == (2, 2)
    assert changes(v2) == {(pan, "/x"): (1, 1, 0, "3", 3)}
    assert lines(v2) == {(pan, "/x"): (2, 2, 0, "4", 4)}
    record(metering, event(acct, ocr, start_time=ts(at(day, 12, zone))))
    record(metering, event(acct, ocr, start_time=ts(at(day + timedelta(days=1), 0, zone))))
    v3 = report(metering, acct, day)
    assert v3.version == 3
    assert changes(v3) == {(ocr, ""): (1, 1, 0, "0.25", 1)}
    assert lines(v3) == {(pan, "/x"): (2, 2, 0, "4", 4), (ocr, ""): (1, 1, 0, "0.25", 1)}
    assert same_totals(v3.totals, live_totals(metering, v3))
    # The old versions, as they stood.
    old = report(metering, acct, day, version=1)
    assert (old.version, old.latest_version) == (1, 3)
    assert lines(old) == lines(v1) and old.create_time == v1.create_time
    assert lines(report(metering, acct, day, version=2)) == lines(v2)
    assert v1.create_time.ToDatetime() <= v2.create_time.ToDatetime() <= v3.create_time.ToDatetime()
    # A duplicate changes nothing: no version.
    assert record(metering, late).duplicate
    assert report(metering, acct, day).latest_version == 3
    with pytest.raises(ReportVersionNotFound):
        report(metering, acct, day, version=4)
    with pytest.raises(ReportVersionNotFound):
        client.get_period_report(acct, day.year, day.month, day.day, period="daily", version=9)


def test_a_batch_makes_one_version_however_many_buckets(
    client: TallyClient, metering: Stub
) -> None:
    acct = account(client)
    pan = product(metering, "1")
    day = local_day(3)
    record(metering, event(acct, pan, endpoint="/e0", start_time=ts(at(day, 0))))
    report(metering, acct, day)  # version 1
    events = [
        event(acct, pan, endpoint=f"/e{i % 3}", start_time=ts(at(day, i % 24, minute=7 * (i % 8))))
        for i in range(60)
    ]
    events.append(event(acct, pan, start_time=ts(at(day, 1))))  # another day: not counted
    events[-1].start_time.CopyFrom(ts(at(day - timedelta(days=1), 1)))
    call(metering.RecordUsageBatch, m.RecordUsageBatchRequest(events=events))
    # One upsert of the rollups: rows inserted (new buckets) and updated (the bucket of
    # the first event), so both statement triggers ran; still one version.
    r = report(metering, acct, day)
    assert (r.version, r.latest_version) == (2, 2)
    assert {k: v[0] for k, v in changes(r).items()} == {
        (pan, "/e0"): 20,
        (pan, "/e1"): 20,
        (pan, "/e2"): 20,
    }
    assert {k: v[0] for k, v in lines(r).items()} == {
        (pan, "/e0"): 21,
        (pan, "/e1"): 20,
        (pan, "/e2"): 20,
    }
    assert same_totals(r.totals, live_totals(metering, r))


def test_a_long_job_finished_late_makes_a_version(client: TallyClient, metering: Stub) -> None:
    acct = account(client)
    job = product(metering, "2")
    day = local_day(4)
    started = call(
        metering.StartUsage,
        m.StartUsageRequest(event=event(acct, job, quantity=5, start_time=ts(at(day, 9)))),
    )
    failing = call(
        metering.StartUsage,
        m.StartUsageRequest(event=event(acct, job, quantity=1, start_time=ts(at(day, 10)))),
    )
    v1 = report(metering, acct, day)
    assert not v1.lines  # started, not finished: not usage yet
    call(
        metering.CompleteUsage,
        m.CompleteUsageRequest(account_id=acct, event_id=started.event.event_id, quantity=3),
    )
    v2 = report(metering, acct, day)
    assert v2.version == 2 and changes(v2) == {(job, ""): (1, 1, 0, "6", 3)}
    call(metering.FailUsage, m.FailUsageRequest(account_id=acct, event_id=failing.event.event_id))
    v3 = report(metering, acct, day)
    assert v3.version == 3 and changes(v3) == {(job, ""): (1, 0, 1, "0", 1)}
    assert lines(v3) == {(job, ""): (2, 1, 1, "6", 4)}
    assert same_totals(v3.totals, live_totals(metering, v3))


def test_an_expired_hold_makes_a_version(client: TallyClient, metering: Stub) -> None:
    """A long job whose hold expires fails: the sweeper's write makes the version."""
    acct = account(client)
    job = product(metering, "2")
    day = local_day(5)
    call(
        metering.StartUsage,
        m.StartUsageRequest(
            event=event(acct, job, endpoint="/j", start_time=ts(at(day, 9))), ttl_seconds=1
        ),
    )
    v1 = report(metering, acct, day)
    # Version 1 was frozen before the hold expired, or after it, with the failure.
    deadline = time.monotonic() + 10
    while report(metering, acct, day).totals.total_requests == 0:
        assert time.monotonic() < deadline, "the expiry never reached the report"
        time.sleep(0.2)
    latest = report(metering, acct, day)
    assert lines(latest) == {(job, "/j"): (1, 0, 1, "0", 1)}
    if not v1.lines:
        assert latest.version == 2 and changes(latest) == lines(latest)
    assert same_totals(latest.totals, live_totals(metering, latest))


def test_tallyctl_period_report(
    server: ServerProcess,
    client: TallyClient,
    metering: Stub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    acct = account(client)
    pan = product(metering, "1.5")
    day = local_day(2)
    record(metering, event(acct, pan, endpoint="/face", start_time=ts(at(day, 6))))
    target = ["--target", server.target]
    assert tallyctl([*target, "period-report", acct, day.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "version:" in out and "1 of 1" in out and "/face" in out and "1.5" in out
    record(metering, event(acct, pan, start_time=ts(at(day, 7))))
    assert tallyctl([*target, "period-report", acct, day.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "2 of 2" in out and "Changes from version 1:" in out
    assert (
        tallyctl([*target, "-o", "json", "period-report", acct, day.isoformat(), "--version", "1"])
        == 0
    )
    assert '"latestVersion": 2' in capsys.readouterr().out
    today = local_day(0)
    assert tallyctl([*target, "period-report", acct, today.strftime("%Y-%m")]) == 1
    assert "PERIOD_NOT_CLOSED" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tallyctl([*target, "period-report", acct, "last-month"])


def test_open_periods_are_refused(client: TallyClient, metering: Stub) -> None:
    acct = account(client, "Pacific/Kiritimati")
    today = local_day(0, "Pacific/Kiritimati")
    with pytest.raises(PeriodNotClosed):
        report(metering, acct, today)
    with pytest.raises(PeriodNotClosed):
        report(metering, acct, today, daily=False)
    with pytest.raises(grpc.RpcError) as raised:
        metering.GetPeriodReport(
            m.GetPeriodReportRequest(account_id=acct, year=2999, month=1), timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"month": 13, "year": 2024}, "month"),
        ({"month": 0, "year": 2024}, "month"),
        ({"month": 2, "year": 2024, "day": 30}, "day"),
        ({"month": 2, "year": 2024, "period": m.USAGE_PERIOD_DAILY}, "day"),
        ({"month": 2, "year": 2024, "period": m.USAGE_PERIOD_YEARLY}, "period"),
        ({"month": 2, "year": 1970}, "year"),
        ({"month": 2, "year": 0}, "year"),
        ({"month": 2, "year": 2024, "version": -1}, "version"),
    ],
)
def test_bad_fields_are_named(
    client: TallyClient, metering: Stub, fields: dict[str, Any], field: str
) -> None:
    acct = account(client)
    with pytest.raises(InvalidArgument) as raised:
        call(metering.GetPeriodReport, m.GetPeriodReportRequest(account_id=acct, **fields))
    assert raised.value.field_violations[0][0] == field


def test_unknown_account(metering: Stub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        metering.GetPeriodReport(
            m.GetPeriodReportRequest(account_id="acct-nobody-here", year=2024, month=1),
            timeout=10,
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_freezing_raced_on_two_replicas_gives_one_version_1(
    client: TallyClient, metering: Stub, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    acct = account(client)
    pan = product(metering, "1")
    day = local_day(5)
    record(metering, event(acct, pan, start_time=ts(at(day, 8))))
    request = m.GetPeriodReportRequest(
        account_id=acct, period=m.USAGE_PERIOD_DAILY, year=day.year, month=day.month, day=day.day
    )
    results = fire(replicas, [("GetPeriodReport", request)] * 16)
    assert all(isinstance(r, m.GetPeriodReportResponse) for r in results), results
    assert {(r.report.version, r.report.latest_version) for r in results} == {(1, 1)}
    assert len({r.report.SerializeToString() for r in results}) == 1


def test_concurrent_backdated_writes_make_consecutive_versions(
    client: TallyClient, metering: Stub, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    acct = account(client)
    pan = product(metering, "0.5")
    day = local_day(6)
    record(metering, event(acct, pan, start_time=ts(at(day, 8))))
    report(metering, acct, day)
    calls: list[tuple[str, Any]] = [
        (
            "RecordUsage",
            m.RecordUsageRequest(
                event=event(acct, pan, endpoint=f"/r{i % 2}", start_time=ts(at(day, i % 24)))
            ),
        )
        for i in range(24)
    ]
    results = fire(replicas, calls)
    assert all(isinstance(r, m.RecordUsageResponse) for r in results), results
    latest = report(metering, acct, day)
    # Group commit may carry several events in one transaction: one version each.
    assert 2 <= latest.latest_version <= 25
    versions = [report(metering, acct, day, version=v) for v in range(1, latest.latest_version + 1)]
    assert [v.version for v in versions] == list(range(1, latest.latest_version + 1))
    running: dict[tuple[str, str], int] = {}
    for v in versions:
        for key, change in changes(v).items():
            running[key] = running.get(key, 0) + change[0]
        if v.version == 1:
            running = {k: x[0] for k, x in lines(v).items()}
        assert {k: x[0] for k, x in lines(v).items()} == {k: n for k, n in running.items() if n}
    assert sum(x[0] for x in lines(latest).values()) == 25
    assert same_totals(latest.totals, live_totals(metering, latest))


def test_freezing_raced_with_backdated_writes_loses_nothing(
    client: TallyClient, metering: Stub, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    """Freezes and writes into the same period at once: whatever the order, the latest
    version equals the live usage of the period."""
    pan = product(metering, "1")
    for attempt in range(3):
        acct = account(client)
        day = local_day(7 + attempt)
        request = m.GetPeriodReportRequest(
            account_id=acct,
            period=m.USAGE_PERIOD_DAILY,
            year=day.year,
            month=day.month,
            day=day.day,
        )
        calls: list[tuple[str, Any]] = []
        for i in range(12):
            calls.append(
                (
                    "RecordUsage",
                    m.RecordUsageRequest(event=event(acct, pan, start_time=ts(at(day, i)))),
                )
            )
            calls.append(("GetPeriodReport", request))
        results = fire(replicas, calls)
        assert not [r for r in results if isinstance(r, BaseException)], results
        latest = report(metering, acct, day)
        assert latest.totals.total_requests == 12
        assert same_totals(latest.totals, live_totals(metering, latest))


# --- the triggers, statement by statement -----------------------------------------

_UPSERT = """
INSERT INTO usage_rollups AS r (account_id, bucket_start, product_id, endpoint, requests,
                                successful, failed, credits, quantity)
SELECT $1, $2::timestamptz + make_interval(mins => 15 * b), 'sql', 'e' || (b % 2), 1, 1, 0,
       1000000, 1
FROM generate_series(0, $3 - 1) b
ON CONFLICT (account_id, bucket_start, product_id, endpoint) DO UPDATE
SET requests = r.requests + 1, successful = r.successful + 1,
    credits = r.credits + excluded.credits, quantity = r.quantity + 1
"""


def test_statements_and_transactions_make_one_version_each(
    client: TallyClient, metering: Stub, database_url: str
) -> None:
    """Straight at the rollups: one statement over many buckets (inserted and updated
    at once), several statements of one transaction, a rolled-back savepoint, and two
    transactions in turn."""
    acct = account(client)
    day = local_day(8)
    start = at(day, 0)
    report(metering, acct, day)  # version 1, empty

    async def main() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            # One statement: 8 new buckets.
            await conn.execute(_UPSERT, acct, start, 8)
            # One upsert updating those 8 and inserting 8 more: both triggers fire.
            await conn.execute(_UPSERT, acct, start, 16)
            # Two statements and a savepoint rolled back, in one transaction.
            async with conn.transaction():
                await conn.execute(_UPSERT, acct, start, 1)
                await conn.execute(_UPSERT, acct, start, 2)
                with contextlib.suppress(RuntimeError):
                    async with conn.transaction():
                        await conn.execute(_UPSERT, acct, start, 4)
                        raise RuntimeError("roll the savepoint back")
            # Outside the period (the next day): no version.
            await conn.execute(_UPSERT, acct, at(day + timedelta(days=1), 0), 3)
        finally:
            await conn.close()

    asyncio.run(main())
    latest = report(metering, acct, day)
    assert latest.latest_version == 4
    v2, v3, v4 = (report(metering, acct, day, version=v) for v in (2, 3, 4))
    assert changes(v2) == {("sql", "e0"): (4, 4, 0, "4", 4), ("sql", "e1"): (4, 4, 0, "4", 4)}
    assert changes(v3) == {("sql", "e0"): (8, 8, 0, "8", 8), ("sql", "e1"): (8, 8, 0, "8", 8)}
    assert changes(v4) == {("sql", "e0"): (2, 2, 0, "2", 2), ("sql", "e1"): (1, 1, 0, "1", 1)}
    assert lines(v4) == {("sql", "e0"): (14, 14, 0, "14", 14), ("sql", "e1"): (13, 13, 0, "13", 13)}
    assert same_totals(v4.totals, live_totals(metering, v4))


def test_concurrent_transactions_number_versions_in_commit_order(
    client: TallyClient, metering: Stub, database_url: str
) -> None:
    """The second writer of a reported period waits for the first's head row lock, then
    numbers its version next."""
    acct = account(client)
    day = local_day(9)
    start = at(day, 0)
    report(metering, acct, day)

    async def main() -> None:
        first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
        try:
            t1 = first.transaction()
            await t1.start()
            await first.execute(_UPSERT, acct, start, 1)
            t2 = second.transaction()
            await t2.start()
            waiting = asyncio.ensure_future(second.execute(_UPSERT, acct, start, 2))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # blocked on the head row
            await first.execute(_UPSERT, acct, start, 1)  # same transaction: same version
            await t1.commit()
            await waiting
            await t2.commit()
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())
    assert report(metering, acct, day).latest_version == 3
    assert changes(report(metering, acct, day, version=2)) == {("sql", "e0"): (2, 2, 0, "2", 2)}
    assert changes(report(metering, acct, day, version=3)) == {
        ("sql", "e0"): (1, 1, 0, "1", 1),
        ("sql", "e1"): (1, 1, 0, "1", 1),
    }
