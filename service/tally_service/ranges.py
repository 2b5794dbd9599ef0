"""Time ranges in an account's time zone: presets, defaults and period buckets."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from tally.v1 import metering_pb2
from tally_service import models, validation
from tally_service.errors import AccountTimeZoneUnknown, InvalidArgument

#: The UsageRange field of GetUsage, ListUsageEvents and ExportUsageReport requests.
RANGE_FIELD = "time_range"

BUCKET = timedelta(minutes=15)  # the rollup grain; every zone offset is a multiple of it
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

PERIOD_UNITS: dict[int, str] = {
    metering_pb2.USAGE_PERIOD_UNSPECIFIED: "month",
    metering_pb2.USAGE_PERIOD_DAILY: "day",
    metering_pb2.USAGE_PERIOD_MONTHLY: "month",
    metering_pb2.USAGE_PERIOD_YEARLY: "year",
}


def account_zone(account: models.Account) -> ZoneInfo:
    """The account's time zone. One stored before validation refused such names (a file
    zoneinfo loads that is not a place, like "posixrules") is FAILED_PRECONDITION, never an
    internal error; `db.translate_state` does the same for a name the database lacks."""
    if not validation.known_time_zone(account.time_zone):
        raise AccountTimeZoneUnknown(account.account_id, account.time_zone)
    return ZoneInfo(account.time_zone)


@dataclass(frozen=True)
class Range:
    start: datetime  # inclusive, UTC
    end: datetime  # exclusive, UTC


def midnight(day: date, zone: ZoneInfo) -> datetime:
    """The instant a local day starts (midnight, or the first instant after a DST gap)."""
    local = datetime.combine(day, time(0), tzinfo=zone)
    instant = local.astimezone(UTC)
    # A midnight skipped by DST maps back to another wall time: keep the later instant.
    if instant.astimezone(zone).date() != day:
        instant = datetime.combine(day, time(1), tzinfo=zone).astimezone(UTC)
    return instant


def add_days(instant: datetime, days: int, zone: ZoneInfo) -> datetime:
    """The same wall-clock time `days` calendar days later (earlier when negative) in
    the zone: a limit stated in days counts the account's days, 23 or 25 hours long
    across a DST change. A wall time that does not exist (in a gap) or exists twice
    (in a fold) maps to the later instant."""
    wall = instant.astimezone(zone).replace(tzinfo=None) + timedelta(days=days)
    return max(wall.replace(tzinfo=zone, fold=f).astimezone(UTC) for f in (0, 1))


def within_days(r: Range, days: int, zone: ZoneInfo) -> bool:
    """Whether the range spans at most `days` of the zone's calendar days."""
    return r.end <= add_days(r.start, days, zone)


def first_of_month(day: date) -> date:
    return day.replace(day=1)


def add_months(day: date, months: int) -> date:
    month = day.month - 1 + months
    return date(day.year + month // 12, month % 12 + 1, 1)


def preset_range(preset: int, zone: ZoneInfo, now: datetime) -> Range:
    today = now.astimezone(zone).date()
    if preset == metering_pb2.RANGE_PRESET_TODAY:
        return Range(midnight(today, zone), now)
    if preset == metering_pb2.RANGE_PRESET_YESTERDAY:
        return Range(midnight(today - timedelta(days=1), zone), midnight(today, zone))
    if preset == metering_pb2.RANGE_PRESET_LAST_7_DAYS:
        return Range(midnight(today - timedelta(days=6), zone), now)
    if preset == metering_pb2.RANGE_PRESET_LAST_30_DAYS:
        return Range(midnight(today - timedelta(days=29), zone), now)
    if preset == metering_pb2.RANGE_PRESET_THIS_MONTH:
        return Range(midnight(first_of_month(today), zone), now)
    if preset == metering_pb2.RANGE_PRESET_LAST_MONTH:
        this_month = first_of_month(today)
        return Range(midnight(add_months(this_month, -1), zone), midnight(this_month, zone))
    raise InvalidArgument("preset", f"unknown preset {preset}")


@dataclass(frozen=True)
class Given:
    """A UsageRange as the caller gave it (checked, not yet resolved)."""

    preset: int
    start: datetime | None
    end: datetime | None

    def key(self) -> list[str]:
        """What a page token is bound to."""
        return [str(self.preset), str(self.start), str(self.end)]


def given(message: metering_pb2.UsageRange, field: str = RANGE_FIELD) -> Given:
    """The one reader of a UsageRange: its timestamps checked, a preset with bounds
    refused (errors name `time_range.<field>`)."""
    start = validation.optional_time(
        message, "start_time", message.start_time, name=f"{field}.start_time"
    )
    end = validation.optional_time(message, "end_time", message.end_time, name=f"{field}.end_time")
    preset = message.preset
    if preset != metering_pb2.RANGE_PRESET_UNSPECIFIED:
        if start is not None or end is not None:
            raise InvalidArgument(
                f"{field}.preset", "give either a preset or start_time/end_time, not both"
            )
        if preset not in metering_pb2.RangePreset.values():
            raise InvalidArgument(f"{field}.preset", f"unknown preset {preset}")
    return Given(preset, start, end)


def resolve_given(
    g: Given,
    zone: ZoneInfo,
    now: datetime,
    default_start: Callable[[datetime], datetime] | None = None,
    field: str = RANGE_FIELD,
) -> Range:
    """The range: the preset's, or the bounds with their defaults (end: now; start:
    `default_start(end)`, else the first of this month)."""
    if g.preset != metering_pb2.RANGE_PRESET_UNSPECIFIED:
        return preset_range(g.preset, zone, now)
    end = now if g.end is None else g.end
    if g.start is not None:
        start = g.start
    elif default_start is not None:
        start = default_start(end)
    else:
        start = midnight(first_of_month(now.astimezone(zone).date()), zone)
    if start > end:
        raise InvalidArgument(f"{field}.start_time", "must not be after end_time")
    return Range(start, end)


def resolve(message: metering_pb2.UsageRange, zone: ZoneInfo, now: datetime) -> Range:
    """A UsageRange resolved: a preset, or explicit bounds (default: this month so far)."""
    return resolve_given(given(message), zone, now)


def period_starts(r: Range, unit: str, zone: ZoneInfo) -> list[datetime]:
    """Local starts (naive, as date_trunc answers them) of every period overlapping r."""
    local = r.start.astimezone(zone).replace(tzinfo=None)
    day = local.date()
    if unit == "day":
        first = day
    elif unit == "month":
        first = day.replace(day=1)
    else:
        first = date(day.year, 1, 1)
    starts: list[datetime] = []
    current = first
    while True:
        instant = midnight(current, zone)
        if instant >= r.end and starts:
            break
        starts.append(datetime.combine(current, time(0)))
        if unit == "day":
            current = current + timedelta(days=1)
        elif unit == "month":
            current = add_months(current, 1)
        else:
            current = date(current.year + 1, 1, 1)
        if len(starts) > 400 * 12 * 31:
            raise InvalidArgument("period", "too many buckets; use a coarser period")
    return starts


def floor_bucket(t: datetime) -> datetime:
    return t - (t - _EPOCH) % BUCKET


def ceil_bucket(t: datetime) -> datetime:
    floored = floor_bucket(t)
    return floored if floored == t else floored + BUCKET
