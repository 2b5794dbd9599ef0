"""Usage statistics: exact totals over any range, from whole-day and 15-minute rollups
plus raw edge events.

The whole local days inside the range (in the account's time zone) come from
`usage_days`; the partial days at its edges from `usage_rollups` (their whole 15-minute
buckets) and `usage_events` itself (the partial buckets at the very edges), so a range
that starts or ends at any instant is still exact. A year is then about 365 rows per
product and endpoint, two days of quarter-hours and a few raw events, whatever the
number of events. Periods (day, month, year: none shorter than a day) are truncated in
the account's time zone.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import text

from tally.v1 import metering_pb2
from tally_service import convert, errors, models, ranges
from tally_service.db import Database
from tally_service.money import MICROS_PER_CREDIT, format_amount
from tally_service.ranges import Range, ceil_bucket, floor_bucket

# Whole days are read from usage_days only from here on: since then every zone's offset
# is a multiple of 15 minutes, so local days are whole 15-minute buckets (the last
# exceptions: Africa/Monrovia at -0:44:30 until 1972, Pacific/Kiritimati at -10:40 until
# October 1979). A range reaching back before it reads its days before it quarter-hour
# by quarter-hour, as every range did before usage_days.
DAYS_SINCE = datetime(1980, 1, 1, tzinfo=UTC)
# The periods made of whole local days (date_trunc units); a shorter one (an hour) would
# read everything from the 15-minute rollups.
DAY_UNITS = frozenset({"day", "week", "month", "quarter", "year"})

# The parts of a range, each summed where it is cheapest, all in local time: whole days
# [first_day, last_day) from usage_days; the edges [start_n, end_n) (n = 1, 2: before
# and after the whole days) from their whole buckets [inner_start_n, inner_end_n) in
# usage_rollups and from raw events in the rest. Every condition is one index range.
# Summed twice: per period, and per product and endpoint (the totals), so that the
# server adds up a few hundred rows, not one per period, product and endpoint.
_STATS = """
WITH parts AS (
    SELECT day::timestamp AS t, product_id, endpoint, requests, successful, failed, credits,
           quantity
    FROM usage_days
    WHERE account_id = :account_id AND day >= :first_day AND day < :last_day
      {product_filter}
    UNION ALL
    SELECT bucket_start AT TIME ZONE :zone, product_id, endpoint, requests, successful, failed,
           credits, quantity
    FROM usage_rollups
    WHERE account_id = :account_id AND bucket_start >= :inner_start_1
      AND bucket_start < :inner_end_1 {product_filter}
    UNION ALL
    SELECT bucket_start AT TIME ZONE :zone, product_id, endpoint, requests, successful, failed,
           credits, quantity
    FROM usage_rollups
    WHERE account_id = :account_id AND bucket_start >= :inner_start_2
      AND bucket_start < :inner_end_2 {product_filter}
    UNION ALL
    SELECT started_at AT TIME ZONE :zone, product_id, endpoint, 1, success::int,
           (NOT success)::int, credits, quantity
    FROM usage_events
    WHERE account_id = :account_id AND status IN ('completed', 'failed')
      AND ((started_at >= :start_1 AND started_at < :inner_start_1)
           OR (started_at >= :inner_end_1 AND started_at < :end_1)
           OR (started_at >= :start_2 AND started_at < :inner_start_2)
           OR (started_at >= :inner_end_2 AND started_at < :end_2)) {product_filter}
)
SELECT grouping(period) = 1, period, product_id, endpoint, sum(requests)::bigint,
       sum(successful)::bigint, sum(failed)::bigint, sum(credits)::bigint,
       sum(quantity)::bigint
FROM (SELECT date_trunc(:unit, t) AS period, * FROM parts) p
GROUP BY GROUPING SETS ((period), (product_id, endpoint))
"""


def whole_days(r: Range, zone: ZoneInfo) -> tuple[date, date] | None:
    """The local days [first, last) that lie wholly inside r (none before DAYS_SINCE)."""
    start = max(r.start, DAYS_SINCE)
    if start >= r.end:
        return None
    first = start.astimezone(zone).date()
    if ranges.midnight(first, zone) < start:
        first += timedelta(days=1)
    last = r.end.astimezone(zone).date()  # the day r.end falls in starts at or before it
    return (first, last) if first < last else None


def _edge(n: int, start: datetime, end: datetime) -> dict[str, datetime]:
    """The parameters of edge n, [start, end): its whole buckets and the rest."""
    inner_start, inner_end = ceil_bucket(start), floor_bucket(end)
    if inner_start >= inner_end:
        inner_start = inner_end = end
    return {
        f"start_{n}": start,
        f"end_{n}": end,
        f"inner_start_{n}": inner_start,
        f"inner_end_{n}": inner_end,
    }


def stats_query(
    account_id: str, r: Range, unit: str, zone: ZoneInfo, product_id: str
) -> tuple[str, dict[str, Any]]:
    """The statistics query of a range, and its parameters."""
    params: dict[str, Any] = {"account_id": account_id, "unit": unit, "zone": zone.key}
    days = whole_days(r, zone) if unit in DAY_UNITS else None
    if days is None:
        # No whole day: one edge, the whole range.
        params.update(first_day=date(2000, 1, 1), last_day=date(2000, 1, 1))
        params.update(_edge(1, r.start, r.end) | _edge(2, r.end, r.end))
    else:
        first, last = days
        params.update(first_day=first, last_day=last)
        params.update(
            _edge(1, r.start, ranges.midnight(first, zone))
            | _edge(2, ranges.midnight(last, zone), r.end)
        )
    product_filter = ""
    if product_id:
        product_filter = "AND product_id = :product_id"
        params["product_id"] = product_id
    return _STATS.format(product_filter=product_filter), params


_EXPIRE_OVERDUE = text(
    "SELECT tally_expire_holds(account_id) FROM holds WHERE account_id = :account_id "
    "AND status = 'pending' AND expires_at <= clock_timestamp() LIMIT 1"
)


@dataclass
class Totals:
    requests: int = 0
    successful: int = 0
    failed: int = 0
    credits: int = 0
    quantity: int = 0

    def add(self, other: "Totals") -> None:
        self.requests += other.requests
        self.successful += other.successful
        self.failed += other.failed
        self.credits += other.credits
        self.quantity += other.quantity


@dataclass
class Stats:
    total: Totals = field(default_factory=Totals)
    by_period: dict[datetime, Totals] = field(default_factory=lambda: defaultdict(Totals))
    by_endpoint: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    by_product: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    by_product_endpoint: dict[tuple[str, str], Totals] = field(
        default_factory=lambda: defaultdict(Totals)
    )


async def stats(
    db: Database, account_id: str, r: Range, unit: str, zone: ZoneInfo, product_id: str
) -> Stats:
    sql, params = stats_query(account_id, r, unit, zone, product_id)
    result = Stats()
    async with db.engine.connect() as conn:
        # Write down holds past their expiry first, so their events count as failed now
        # rather than when the sweeper next runs (a no-op without overdue holds).
        await conn.execute(_EXPIRE_OVERDUE, {"account_id": account_id})
        await conn.commit()
        rows = await conn.execute(text(sql), params)
        for per_product, period, product, endpoint, *numbers in rows:
            totals = Totals(*numbers)
            if not per_product:
                result.by_period[period] = totals
                continue
            result.total.add(totals)
            result.by_endpoint[endpoint].add(totals)
            result.by_product[product].add(totals)
            result.by_product_endpoint[(product, endpoint)] = totals
    return result


async def usage_response(
    db: Database,
    account: models.Account,
    period: int,
    r: ranges.Range,
    product_id: str,
) -> metering_pb2.GetUsageResponse:
    zone = ZoneInfo(account.time_zone)
    unit = ranges.PERIOD_UNITS.get(period)
    if unit is None:
        raise errors.InvalidArgument("period", f"unknown period {period}")
    s = await stats(db, account.account_id, r, unit, zone, product_id)
    response = metering_pb2.GetUsageResponse(
        account_id=account.account_id,
        period=cast(
            metering_pb2.UsagePeriod.ValueType, period or metering_pb2.USAGE_PERIOD_MONTHLY
        ),
        totals=totals_message(s.total, r.start, r.end),
    )
    for endpoint, t in s.by_endpoint.items():
        response.requests_by_endpoint[endpoint] = t.requests
    for product, t in s.by_product.items():
        response.requests_by_product[product] = t.requests
        response.credits_by_product[product] = format_amount(t.credits)
    starts = ranges.period_starts(r, unit, zone)
    # Each period's bounds: its local start's instant (once each), clipped to the range.
    bounds = [max(r.start, ranges.midnight(local.date(), zone)) for local in starts]
    bounds.append(r.end)
    for i, local_start in enumerate(starts):
        t = s.by_period.get(local_start, Totals())
        response.buckets.append(totals_message(t, bounds[i], min(r.end, bounds[i + 1])))
    return response


def average(credits: int, requests: int) -> str:
    if not requests:
        return "0"
    value = (Decimal(credits) / MICROS_PER_CREDIT / requests).quantize(
        Decimal("0.000001"), rounding=ROUND_HALF_EVEN
    )
    return format_amount(int(value * MICROS_PER_CREDIT))


def totals_message(t: Totals, start: datetime, end: datetime) -> metering_pb2.UsageTotals:
    return metering_pb2.UsageTotals(
        period_start=convert.timestamp(start),
        period_end=convert.timestamp(end),
        total_requests=t.requests,
        successful_requests=t.successful,
        failed_requests=t.failed,
        credits_consumed=format_amount(t.credits),
        quantity=t.quantity,
        average_credits_per_request=average(t.credits, t.requests),
    )
