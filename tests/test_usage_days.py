"""GetUsage over whole local days (`usage_days`) is exact to the event: the same answer as
a brute-force sum over the raw events, for ranges with odd edges, in a DST zone and in a
zone half an hour off UTC, with and without a product filter, after backdating and after
the account's time zone changes; and `usage_days` always equals the 15-minute rollups
summed per local day, whichever path wrote them."""

import asyncio
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from tally.v1 import metering_pb2 as m
from tally_client import TallyClient, usage_event
from tally_service import ranges, reads
from tally_service.money import format_amount
from tests.conftest import ServerProcess, new_database, start_server

LOS_ANGELES, KOLKATA = "America/Los_Angeles", "Asia/Kolkata"
DAILY, MONTHLY = m.USAGE_PERIOD_DAILY, m.USAGE_PERIOD_MONTHLY
UNITS: dict[int, str] = {DAILY: "day", MONTHLY: "month"}
SPAN = timedelta(days=380)  # how far back the events go (a spring-forward and two fall-backs)


@pytest.fixture(scope="module")
def days_database_url(admin_url: str) -> str:
    return new_database(admin_url)


@pytest.fixture(scope="module")
def days_server(days_database_url: str, server_log_dir: Path) -> Iterator[ServerProcess]:
    # Events may be dated a year back, so that ranges cross months and DST changes.
    process = start_server(
        days_database_url,
        server_log_dir,
        {"TALLY_USAGE_BACKDATE_DAYS": "400", "TALLY_SWEEP_INTERVAL_SECONDS": "3600"},
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def days_client(days_server: ServerProcess) -> Iterator[TallyClient]:
    with TallyClient(days_server.target, timeout_seconds=30) as c:
        yield c


def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


@dataclass(frozen=True)
class Event:
    started_at: datetime
    product_id: str
    endpoint: str
    success: bool
    credits: int
    quantity: int


def raw_events(url: str, account_id: str) -> list[Event]:
    rows = fetch(
        url,
        "SELECT started_at, product_id, endpoint, success, credits, quantity FROM usage_events "
        "WHERE account_id = $1 AND status IN ('completed', 'failed')",
        account_id,
    )
    return [Event(*r) for r in rows]


def period_key(instant: datetime, unit: str, zone: ZoneInfo) -> date:
    day = instant.astimezone(zone).date()
    return day if unit == "day" else day.replace(day=1)


def summary(
    rows: list[tuple[str, str, bool, int, int]],
) -> tuple[int, int, int, str, int]:
    return (
        len(rows),
        sum(1 for r in rows if r[2]),
        sum(1 for r in rows if not r[2]),
        format_amount(sum(r[3] for r in rows)),
        sum(r[4] for r in rows),
    )


def totals(t: m.UsageTotals) -> tuple[int, int, int, str, int]:
    return (
        t.total_requests,
        t.successful_requests,
        t.failed_requests,
        t.credits_consumed,
        t.quantity,
    )


def assert_brute_force(
    client: TallyClient,
    events: list[Event],
    account_id: str,
    zone: ZoneInfo,
    start: datetime,
    end: datetime,
    period: int,
    product_id: str = "",
) -> None:
    """GetUsage over [start, end) equals the sums over the raw events, total by total."""
    unit = UNITS[period]
    chosen = [
        e
        for e in events
        if start <= e.started_at < end and (not product_id or e.product_id == product_id)
    ]
    by_period: dict[date, list[tuple[str, str, bool, int, int]]] = defaultdict(list)
    for e in chosen:
        by_period[period_key(e.started_at, unit, zone)].append(
            (e.product_id, e.endpoint, e.success, e.credits, e.quantity)
        )
    got = client.get_usage(
        account_id, period=period, start_time=start, end_time=end, product_id=product_id
    )
    where = f"{zone.key} [{start.isoformat()}, {end.isoformat()}) {unit} {product_id!r}"
    flat = [row for rows in by_period.values() for row in rows]
    assert totals(got.totals) == summary(flat), where
    buckets = {
        period_key(b.period_start.ToDatetime(tzinfo=UTC), unit, zone): totals(b)
        for b in got.buckets
        if b.total_requests
    }
    assert buckets == {k: summary(v) for k, v in by_period.items()}, where
    assert got.buckets[0].period_start.ToDatetime(tzinfo=UTC) == start, where
    requests_by_endpoint: dict[str, int] = defaultdict(int)
    requests_by_product: dict[str, int] = defaultdict(int)
    credits_by_product: dict[str, int] = defaultdict(int)
    for e in chosen:
        requests_by_endpoint[e.endpoint] += 1
        requests_by_product[e.product_id] += 1
        credits_by_product[e.product_id] += e.credits
    assert dict(got.requests_by_endpoint) == requests_by_endpoint, where
    assert dict(got.requests_by_product) == requests_by_product, where
    assert dict(got.credits_by_product) == {
        k: format_amount(v) for k, v in credits_by_product.items()
    }, where


def assert_days_match_rollups(url: str) -> None:
    """usage_days is exactly the rollups summed per local day of their account."""
    expected = fetch(
        url,
        "SELECT r.account_id, (r.bucket_start AT TIME ZONE a.time_zone)::date AS day, "
        "r.product_id, r.endpoint, sum(r.requests)::bigint, sum(r.successful)::bigint, "
        "sum(r.failed)::bigint, sum(r.credits)::bigint, sum(r.quantity)::bigint "
        "FROM usage_rollups r JOIN accounts a ON a.account_id = r.account_id "
        "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
    )
    days = fetch(
        url,
        "SELECT account_id, day, product_id, endpoint, requests, successful, failed, credits, "
        "quantity FROM usage_days ORDER BY 1, 2, 3, 4",
    )
    assert [tuple(r) for r in days] == [tuple(r) for r in expected]


def instants_near_edges(zone: ZoneInfo, now: datetime, rng: random.Random) -> list[datetime]:
    """Event instants: spread over the span, and within seconds of local midnights and
    of 15-minute boundaries (where the edges of days and buckets are)."""
    out = [now - SPAN * rng.random() for _ in range(150)]
    today = now.astimezone(zone).date()
    for _ in range(120):
        day = today - timedelta(days=rng.randrange(1, SPAN.days))
        out.append(ranges.midnight(day, zone) + timedelta(seconds=rng.uniform(-90, 90)))
    for _ in range(60):
        boundary = ranges.floor_bucket(now - SPAN * rng.random())
        out.append(boundary + timedelta(microseconds=rng.randrange(-2_000_000, 2_000_000)))
    # The days around this zone's DST changes of the span, hour by hour.
    day = today - timedelta(days=SPAN.days - 1)
    while day < today:
        if ranges.midnight(day + timedelta(days=1), zone) - ranges.midnight(day, zone) != (
            timedelta(days=1)
        ):
            for hour in range(-2, 27, 3):
                out.append(ranges.midnight(day, zone) + timedelta(hours=hour, seconds=17))
        day += timedelta(days=1)
    return [t for t in out if now - SPAN < t < now - timedelta(minutes=1)]


def record_events(
    client: TallyClient, account_id: str, products: list[str], instants: list[datetime]
) -> None:
    """In batches of 100, so later batches update the buckets earlier ones created."""
    rng = random.Random(account_id)
    events = []
    for t in instants:
        success = rng.random() < 0.8
        events.append(
            usage_event(
                account_id,
                f"ev-{uuid.uuid4().hex}",
                rng.choice(products),
                endpoint=rng.choice(["/a", "/b", "/c/d"]),
                status="completed" if success or rng.random() < 0.5 else "failed",
                success=success,
                quantity=rng.randrange(1, 4),
                start_time=t,
            )
        )
    for i in range(0, len(events), 100):
        reply = client.record_usage_batch(events[i : i + 100])
        assert all(r.status.code == 0 for r in reply.results), reply.results[0].status


def random_ranges(
    zone: ZoneInfo, now: datetime, rng: random.Random, n: int
) -> list[tuple[datetime, datetime]]:
    """Ranges of every shape: odd instants, local midnights, 15-minute boundaries; from
    minutes to a year; inside one day, across days, months and DST changes."""
    out = []
    for i in range(n):
        a = now - SPAN * rng.random()
        length = rng.choice(
            [
                timedelta(minutes=rng.uniform(1, 300)),
                timedelta(hours=rng.uniform(20, 50)),
                timedelta(days=rng.uniform(2, 40)),
                timedelta(days=rng.uniform(60, 379)),
            ]
        )
        b = min(now, a + length)
        if i % 4 == 1:  # local midnights
            a = ranges.midnight(a.astimezone(zone).date(), zone)
            b = ranges.midnight(b.astimezone(zone).date(), zone)
        elif i % 4 == 2:  # 15-minute boundaries
            a, b = ranges.floor_bucket(a), ranges.floor_bucket(b)
        if a < b:
            out.append((a, b))
    return out


@pytest.fixture(scope="module")
def products(days_client: TallyClient) -> list[str]:
    out = []
    for price in ("1.5", "0.25"):
        product_id = f"prod-{uuid.uuid4().hex[:10]}"
        days_client.upsert_product(product_id, price, charge_failed=True)
        out.append(product_id)
    return out


def new_account(client: TallyClient, zone: str) -> str:
    account_id = f"acct-{uuid.uuid4().hex[:16]}"
    client.create_account(account_id, time_zone=zone)
    client.top_up(account_id, "1000000")
    return account_id


@pytest.mark.parametrize("zone_name", [LOS_ANGELES, KOLKATA])
def test_get_usage_equals_brute_force_then_after_a_time_zone_change(
    days_client: TallyClient, days_database_url: str, products: list[str], zone_name: str
) -> None:
    zone = ZoneInfo(zone_name)
    rng = random.Random(zone_name)
    now = datetime.now(UTC)
    account_id = new_account(days_client, zone_name)
    record_events(days_client, account_id, products, instants_near_edges(zone, now, rng))
    events = raw_events(days_database_url, account_id)
    assert len(events) > 300
    assert_days_match_rollups(days_database_url)
    cases = random_ranges(zone, now, rng, 16)
    for i, (start, end) in enumerate(cases):
        for period in (DAILY, MONTHLY):
            product = products[i % 2] if i % 3 == 0 else ""
            assert_brute_force(days_client, events, account_id, zone, start, end, period, product)

    # (c) The account moves to the other zone: its days are re-bucketed in the same
    # transaction, and every answer is still the brute force one in the new zone.
    other = ZoneInfo(KOLKATA if zone_name == LOS_ANGELES else LOS_ANGELES)
    days_client.update_account(account_id, time_zone=other.key)
    assert_days_match_rollups(days_database_url)
    for i, (start, end) in enumerate(random_ranges(other, now, rng, 10)):
        for period in (DAILY, MONTHLY):
            product = products[i % 2] if i % 2 == 0 else ""
            assert_brute_force(days_client, events, account_id, other, start, end, period, product)


def test_a_backdated_event_lands_in_its_old_day(
    days_client: TallyClient, days_database_url: str, products: list[str]
) -> None:
    zone = ZoneInfo(LOS_ANGELES)
    account_id = new_account(days_client, LOS_ANGELES)
    today = datetime.now(zone).date()
    old_day = today - timedelta(days=200)
    noon = ranges.midnight(old_day, zone) + timedelta(hours=12)
    start, end = ranges.midnight(old_day - timedelta(days=3), zone), datetime.now(UTC)
    before = days_client.get_usage(account_id, period=DAILY, start_time=start, end_time=end)
    assert before.totals.total_requests == 0
    days_client.record_usage(account_id, "late", products[0], start_time=noon)
    after = days_client.get_usage(account_id, period=DAILY, start_time=start, end_time=end)
    assert after.totals.total_requests == 1
    assert [b.total_requests for b in after.buckets][3] == 1
    rows = fetch(
        days_database_url,
        "SELECT day, requests FROM usage_days WHERE account_id = $1",
        account_id,
    )
    assert [tuple(r) for r in rows] == [(old_day, 1)]
    events = raw_events(days_database_url, account_id)
    for period in (DAILY, MONTHLY):
        assert_brute_force(days_client, events, account_id, zone, start, end, period)
    assert_days_match_rollups(days_database_url)


def test_days_follow_every_writer_of_the_rollups(
    days_client: TallyClient, days_database_url: str, products: list[str]
) -> None:
    """(d) A mixed workload: batches, single events, started jobs completed, failed and
    expired (their hold written down by GetUsage, or the sweeper), backdated too."""
    zone = ZoneInfo(KOLKATA)
    account_id = new_account(days_client, KOLKATA)
    now = datetime.now(UTC)
    rng = random.Random(7)
    record_events(
        days_client,
        account_id,
        products,
        [now - timedelta(days=rng.uniform(0, 30)) for _ in range(150)],
    )
    days_client.record_usage(account_id, "one", products[1], start_time=now - timedelta(days=9))
    for i, back in enumerate((0, 2, 40)):
        at = now - timedelta(days=back, minutes=3)
        days_client.start_usage(account_id, f"done-{i}", products[0], start_time=at)
        days_client.complete_usage(account_id, f"done-{i}", quantity=1)
        days_client.start_usage(account_id, f"fail-{i}", products[1], start_time=at)
        days_client.fail_usage(account_id, f"fail-{i}", status_code=500)
        days_client.start_usage(
            account_id, f"expire-{i}", products[0], ttl_seconds=1, start_time=at
        )
    time.sleep(1.3)
    usage = days_client.get_usage(
        account_id, period=MONTHLY, start_time=now - timedelta(days=60), end_time=now
    )
    expired = fetch(
        days_database_url,
        "SELECT count(*) FROM usage_events WHERE account_id = $1 AND message = 'EXPIRED'",
        account_id,
    )
    assert expired[0][0] == 3
    assert usage.totals.total_requests == 150 + 1 + 9
    assert_days_match_rollups(days_database_url)
    events = raw_events(days_database_url, account_id)
    for start, end in random_ranges(zone, now, rng, 8):
        assert_brute_force(days_client, events, account_id, zone, start, end, DAILY)


def test_whole_days_of_a_range() -> None:
    la, kolkata = ZoneInfo(LOS_ANGELES), ZoneInfo(KOLKATA)
    # 2026-03-08 is 23 hours long in Los Angeles; a range from its midnight has it whole.
    start = ranges.midnight(date(2026, 3, 8), la)
    assert reads.whole_days(ranges.Range(start, start + timedelta(hours=23)), la) == (
        date(2026, 3, 8),
        date(2026, 3, 9),
    )
    assert reads.whole_days(ranges.Range(start, start + timedelta(hours=22)), la) is None
    # One microsecond after a local midnight: that day is an edge, the next one whole.
    r = ranges.Range(
        datetime(2026, 1, 9, 18, 30, 0, 1, tzinfo=UTC), datetime(2026, 1, 12, 1, tzinfo=UTC)
    )
    assert reads.whole_days(r, kolkata) == (date(2026, 1, 11), date(2026, 1, 12))
    # Before 1980 some zones' midnights cut a 15-minute bucket: no whole days there.
    old = ranges.Range(datetime(1971, 1, 1, tzinfo=UTC), datetime(1980, 1, 3, tzinfo=UTC))
    assert reads.whole_days(old, ZoneInfo("Africa/Monrovia")) == (
        date(1980, 1, 1),
        date(1980, 1, 3),
    )
    early = ranges.Range(datetime(1971, 1, 1, tzinfo=UTC), datetime(1979, 1, 3, tzinfo=UTC))
    assert reads.whole_days(early, ZoneInfo("Africa/Monrovia")) is None
