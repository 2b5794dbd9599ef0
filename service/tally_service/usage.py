"""Usage statistics: exact totals over any range, from rollups plus raw edge events.

Whole 15-minute buckets inside the range come from `usage_rollups`; the partial
buckets at its edges come from `usage_events` itself, so a range that starts or ends
at any instant is still exact. Periods are truncated in the account's time zone.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import text

from tally.v1 import metering_pb2
from tally_service import convert, errors, models, ranges
from tally_service.db import Database
from tally_service.money import MICROS_PER_CREDIT, format_amount
from tally_service.ranges import Range, ceil_bucket, floor_bucket

_STATS = """
WITH parts AS (
    SELECT bucket_start AS t, product_id, endpoint, requests, successful, failed, credits,
           quantity
    FROM usage_rollups
    WHERE account_id = :account_id AND bucket_start >= :inner_start
      AND bucket_start < :inner_end {product_filter}
    UNION ALL
    SELECT started_at, product_id, endpoint, 1, success::int, (NOT success)::int, credits,
           quantity
    FROM usage_events
    WHERE account_id = :account_id AND status IN ('completed', 'failed')
      AND ((started_at >= :start AND started_at < :inner_start)
           OR (started_at >= :inner_end AND started_at < :end)) {product_filter}
)
SELECT date_trunc(:unit, t AT TIME ZONE :zone) AS period, product_id, endpoint,
       sum(requests)::bigint, sum(successful)::bigint, sum(failed)::bigint,
       sum(credits)::bigint, sum(quantity)::bigint
FROM parts GROUP BY 1, 2, 3
"""


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
    inner_start, inner_end = ceil_bucket(r.start), floor_bucket(r.end)
    if inner_start >= inner_end:
        inner_start = inner_end = r.end
    params: dict[str, Any] = {
        "account_id": account_id,
        "start": r.start,
        "end": r.end,
        "inner_start": inner_start,
        "inner_end": inner_end,
        "unit": unit,
        "zone": zone.key,
    }
    product_filter = ""
    if product_id:
        product_filter = "AND product_id = :product_id"
        params["product_id"] = product_id
    result = Stats()
    async with db.engine.connect() as conn:
        # Write down holds past their expiry first, so their events count as failed now
        # rather than when the sweeper next runs (a no-op without overdue holds).
        await conn.execute(_EXPIRE_OVERDUE, {"account_id": account_id})
        await conn.commit()
        rows = await conn.execute(text(_STATS.format(product_filter=product_filter)), params)
        for period, product, endpoint, *numbers in rows:
            totals = Totals(*numbers)
            result.total.add(totals)
            result.by_period[period].add(totals)
            result.by_endpoint[endpoint].add(totals)
            result.by_product[product].add(totals)
            result.by_product_endpoint[(product, endpoint)].add(totals)
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
    for i, local_start in enumerate(starts):
        begin = max(r.start, ranges.midnight(local_start.date(), zone))
        end = (
            min(r.end, ranges.midnight(starts[i + 1].date(), zone))
            if i + 1 < len(starts)
            else r.end
        )
        t = s.by_period.get(local_start, Totals())
        response.buckets.append(totals_message(t, begin, end))
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
