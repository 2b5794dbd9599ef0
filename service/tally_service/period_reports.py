"""Period reports: the usage of one account in one closed day or month of its time
zone, versioned (docs/design.md, "Period reports").

Version 1 is frozen by `tally_freeze_period_report` (sql/85_reports.sql) the first time
a closed period is asked for; later versions are appended by the triggers of migration
0012 in the transaction of the write that changed the period. The versions are read by
`reads.period_report_version`.
"""

import calendar
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import text

from tally.v1 import metering_pb2
from tally_service import errors, models, ranges, reads, validation
from tally_service.db import Database

#: The periods a report may cover (a year is not reported: it outlasts the
#: backdating window by far, and its months are).
UNITS: dict[int, str] = {
    metering_pb2.USAGE_PERIOD_UNSPECIFIED: "month",
    metering_pb2.USAGE_PERIOD_DAILY: "day",
    metering_pb2.USAGE_PERIOD_MONTHLY: "month",
}

_FREEZE = text(
    "SELECT tally_freeze_period_report(:account_id, :period, :local_start, :time_zone, "
    ":start, :end)"
)


@dataclass(frozen=True)
class Period:
    """A calendar period of a time zone: its unit ("day" or "month"), first local day
    and instants [start, end)."""

    unit: str
    local_start: date
    start: datetime
    end: datetime


def period_of(period: int, year: int, month: int, day: int, zone: ZoneInfo) -> Period:
    """The day or month holding the local date year-month-day (for a month, day 0 means
    its first day); INVALID_ARGUMENT naming the field that is out of range."""
    unit = UNITS.get(period)
    if unit is None:
        raise errors.InvalidArgument("period", "must be DAILY or MONTHLY")
    if not 1 <= month <= 12:
        raise errors.InvalidArgument("month", "must be 1 to 12")
    if not validation.MIN_TIME.year < year < validation.MAX_TIME.year - 1:
        raise errors.InvalidArgument(
            "year",
            f"must be {validation.MIN_TIME.year + 1} to {validation.MAX_TIME.year - 2}",
        )
    days = calendar.monthrange(year, month)[1]
    if unit == "day":
        if not 1 <= day <= days:
            raise errors.InvalidArgument("day", f"must be 1 to {days} for a DAILY report")
        first = date(year, month, day)
        after = first + timedelta(days=1)
    else:
        if not 0 <= day <= days:
            raise errors.InvalidArgument("day", f"must be 0 to {days}")
        first = date(year, month, 1)
        after = ranges.add_months(first, 1)
    return Period(unit, first, ranges.midnight(first, zone), ranges.midnight(after, zone))


async def get(
    db: Database, account: models.Account, p: Period, version: int, now: datetime
) -> reads.PeriodReportVersion:
    """The report of a closed period as it stood at `version` (0: the latest; the
    servicer refused a negative one), frozen first if it never was."""
    if p.end > now:
        raise errors.PeriodNotClosed(
            f"the {p.unit} starting {p.local_start.isoformat()} ends at {p.end.isoformat()},"
            " after now; only a closed period has a report",
            metadata={"account_id": account.account_id, "period_end": p.end.isoformat()},
        )
    report_id = await reads.find_period_report(db, account.account_id, p.unit, p.local_start)
    if report_id is None:
        # What fell due (a hold's expiry failing its job) is written down first, as
        # for GetUsage, so that version 1 counts it.
        await reads.catch_up(db, account.account_id)
        async with db.engine.begin() as conn:
            report_id = (
                await conn.execute(
                    _FREEZE,
                    {
                        "account_id": account.account_id,
                        "period": p.unit,
                        "local_start": p.local_start,
                        "time_zone": account.time_zone,
                        "start": p.start,
                        "end": p.end,
                    },
                )
            ).scalar()
        if report_id is None:
            raise errors.NotFound("account", account.account_id)
    found = await reads.period_report_version(db, report_id, version)
    if found is None:
        raise errors.NotFound("report_version", str(version))
    return found
