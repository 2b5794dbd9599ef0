"""GetUsage's answer (also GetAccountSummary's month): the period's unit, the
statistics from `reads.usage_stats`, the message from `convert.usage`."""

from tally.v1 import metering_pb2
from tally_service import convert, errors, models, ranges, reads
from tally_service.db import Database


async def usage_response(
    db: Database,
    account: models.Account,
    period: int,
    r: ranges.Range,
    product_id: str,
) -> metering_pb2.GetUsageResponse:
    zone = ranges.account_zone(account)
    unit = ranges.PERIOD_UNITS.get(period)
    if unit is None:
        raise errors.InvalidArgument("period", f"unknown period {period}")
    s = await reads.usage_stats(db, account.account_id, r, unit, zone, product_id)
    return convert.usage(account.account_id, period, r, unit, zone, s)
