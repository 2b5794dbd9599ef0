"""Period reports: the usage of one account in one closed day or month of its time
zone, versioned (docs/design.md, "Period reports").

Version 1 is frozen by `tally_freeze_period_report` (sql/85_reports.sql) the first time
a closed period is asked for; later versions are appended by the triggers of migration
0012 in the transaction of the write that changed the period. A version stores what
changed; the lines at version N are the sums of the changes of versions 1 to N.
"""

import calendar
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import text

from tally.v1 import metering_pb2
from tally_service import errors, models, ranges, validation
from tally_service.db import Database

#: The periods a report may cover (a year is not reported: it outlasts the
#: backdating window by far, and its months are).
UNITS: dict[int, str] = {
    metering_pb2.USAGE_PERIOD_UNSPECIFIED: "month",
    metering_pb2.USAGE_PERIOD_DAILY: "day",
    metering_pb2.USAGE_PERIOD_MONTHLY: "month",
}

_EXPIRE_OVERDUE = text(
    "SELECT tally_expire_holds(account_id) FROM holds WHERE account_id = :account_id "
    "AND status = 'pending' AND expires_at <= clock_timestamp() LIMIT 1"
)
_FIND = text(
    "SELECT report_id FROM period_reports "
    "WHERE account_id = :account_id AND period = :period AND local_start = :local_start"
)
_FREEZE = text(
    "SELECT tally_freeze_period_report(:account_id, :period, :local_start, :time_zone, "
    ":start, :end)"
)
_HEAD = text(
    "SELECT h.version, h.time_zone, h.period_start, h.period_end, v.version, v.created_at "
    "FROM period_reports h "
    "LEFT JOIN period_report_versions v "
    "  ON v.report_id = h.report_id AND v.version = coalesce(:version, h.version) "
    "WHERE h.report_id = :report_id"
)
_SUMS = """
SELECT product_id, endpoint, sum(requests)::bigint, sum(successful)::bigint,
       sum(failed)::bigint, sum(credits)::bigint, sum(quantity)::bigint
FROM period_report_changes
WHERE report_id = :report_id AND {versions}
GROUP BY product_id, endpoint
HAVING sum(requests) <> 0 OR sum(successful) <> 0 OR sum(failed) <> 0
    OR sum(credits) <> 0 OR sum(quantity) <> 0
ORDER BY product_id, endpoint
"""
_LINES = text(_SUMS.format(versions="version <= :version"))
_CHANGES = text(_SUMS.format(versions="version = :version AND version > 1"))


@dataclass(frozen=True)
class Period:
    """A calendar period of a time zone: its unit ("day" or "month"), first local day
    and instants [start, end)."""

    unit: str
    local_start: date
    start: datetime
    end: datetime


@dataclass
class Line:
    """Usage of one product and endpoint (or, in `changes`, its difference)."""

    product_id: str
    endpoint: str
    requests: int = 0
    successful: int = 0
    failed: int = 0
    credits: int = 0
    quantity: int = 0


@dataclass
class Report:
    account_id: str
    period: int  # a UsagePeriod value
    time_zone: str
    local_start: date
    start: datetime
    end: datetime
    version: int
    latest_version: int
    created_at: datetime
    lines: list[Line] = field(default_factory=list)
    changes: list[Line] = field(default_factory=list)

    def total(self) -> Line:
        out = Line("", "")
        for line in self.lines:
            out.requests += line.requests
            out.successful += line.successful
            out.failed += line.failed
            out.credits += line.credits
            out.quantity += line.quantity
        return out


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
) -> Report:
    """The report of a closed period as it stood at `version` (0: the latest), frozen
    first if it never was."""
    if version < 0:
        raise errors.InvalidArgument("version", "must not be negative")
    if p.end > now:
        raise errors.PeriodNotClosed(
            f"the {p.unit} starting {p.local_start.isoformat()} ends at {p.end.isoformat()},"
            " after now; only a closed period has a report",
            metadata={"account_id": account.account_id, "period_end": p.end.isoformat()},
        )
    key = {"account_id": account.account_id, "period": p.unit, "local_start": p.local_start}
    async with db.engine.connect() as conn:
        report_id = (await conn.execute(_FIND, key)).scalar()
        await conn.commit()
        if report_id is None:
            # Holds past their expiry are written down first, as GetUsage does, so that
            # version 1 counts their events as failed.
            await conn.execute(_EXPIRE_OVERDUE, {"account_id": account.account_id})
            await conn.commit()
            report_id = (
                await conn.execute(
                    _FREEZE,
                    {**key, "time_zone": account.time_zone, "start": p.start, "end": p.end},
                )
            ).scalar()
            await conn.commit()
            if report_id is None:
                raise errors.NotFound("account", account.account_id)
        head = (
            await conn.execute(_HEAD, {"report_id": report_id, "version": version or None})
        ).one()
        latest, time_zone, start, end, found, created_at = head
        if found is None:
            raise errors.NotFound("report_version", str(version))
        where = {"report_id": report_id, "version": found}
        lines = [Line(*row) for row in await conn.execute(_LINES, where)]
        changes = [Line(*row) for row in await conn.execute(_CHANGES, where)]
        await conn.commit()
    return Report(
        account_id=account.account_id,
        period=metering_pb2.USAGE_PERIOD_DAILY
        if p.unit == "day"
        else metering_pb2.USAGE_PERIOD_MONTHLY,
        time_zone=time_zone,
        local_start=p.local_start,
        start=start,
        end=end,
        version=found,
        latest_version=latest,
        created_at=created_at,
        lines=lines,
        changes=changes,
    )
