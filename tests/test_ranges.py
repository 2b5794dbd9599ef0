"""Preset ranges and period buckets in non-UTC zones, across DST and month ends."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from tally.v1 import metering_pb2 as m
from tally_service.errors import InvalidArgument
from tally_service.ranges import (
    Range,
    ceil_bucket,
    floor_bucket,
    period_starts,
    preset_range,
    resolve,
)

KOLKATA = ZoneInfo("Asia/Kolkata")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_kolkata_presets() -> None:
    now = utc(2026, 3, 1, 2, 0)  # 07:30 on 1 March in Kolkata (+05:30)
    today = preset_range(m.RANGE_PRESET_TODAY, KOLKATA, now)
    assert today == Range(utc(2026, 2, 28, 18, 30), now)
    yesterday = preset_range(m.RANGE_PRESET_YESTERDAY, KOLKATA, now)
    assert yesterday == Range(utc(2026, 2, 27, 18, 30), utc(2026, 2, 28, 18, 30))
    assert preset_range(m.RANGE_PRESET_THIS_MONTH, KOLKATA, now).start == utc(2026, 2, 28, 18, 30)
    last_month = preset_range(m.RANGE_PRESET_LAST_MONTH, KOLKATA, now)
    assert last_month == Range(utc(2026, 1, 31, 18, 30), utc(2026, 2, 28, 18, 30))
    assert preset_range(m.RANGE_PRESET_LAST_7_DAYS, KOLKATA, now).start == utc(2026, 2, 22, 18, 30)
    assert preset_range(m.RANGE_PRESET_LAST_30_DAYS, KOLKATA, now).start == utc(2026, 1, 30, 18, 30)


def test_los_angeles_across_spring_forward() -> None:
    # DST starts 8 March 2026 at 02:00 PST: that day has 23 hours.
    now = utc(2026, 3, 9, 20, 0)  # 13:00 PDT on 9 March
    yesterday = preset_range(m.RANGE_PRESET_YESTERDAY, LOS_ANGELES, now)
    assert yesterday == Range(utc(2026, 3, 8, 8, 0), utc(2026, 3, 9, 7, 0))
    week = preset_range(m.RANGE_PRESET_LAST_7_DAYS, LOS_ANGELES, now)
    assert week.start == utc(2026, 3, 3, 8, 0)  # midnight PST
    starts = period_starts(week, "day", LOS_ANGELES)
    assert [s.day for s in starts] == [3, 4, 5, 6, 7, 8, 9]


def test_los_angeles_fall_back_month_end() -> None:
    # DST ends 1 November 2026; October in LA runs from PDT midnight to PDT midnight.
    now = utc(2026, 11, 1, 20, 0)
    last_month = preset_range(m.RANGE_PRESET_LAST_MONTH, LOS_ANGELES, now)
    assert last_month == Range(utc(2026, 10, 1, 7, 0), utc(2026, 11, 1, 7, 0))
    today = preset_range(m.RANGE_PRESET_TODAY, LOS_ANGELES, now)
    assert today.start == utc(2026, 11, 1, 7, 0)  # still PDT at midnight; 25-hour day


def test_explicit_and_preset_are_exclusive() -> None:
    now = utc(2026, 5, 15)

    def usage_range(
        preset: int = 0, start: datetime | None = None, end: datetime | None = None
    ) -> m.UsageRange:
        r = m.UsageRange(preset=preset)  # type: ignore[arg-type]
        if start is not None:
            r.start_time.FromDatetime(start)
        if end is not None:
            r.end_time.FromDatetime(end)
        return r

    with pytest.raises(InvalidArgument) as both:
        resolve(usage_range(m.RANGE_PRESET_TODAY, utc(2026, 5, 1)), KOLKATA, now)
    assert both.value.field == "time_range.preset"
    with pytest.raises(InvalidArgument) as reversed_bounds:
        resolve(usage_range(0, utc(2026, 5, 2), utc(2026, 5, 1)), KOLKATA, now)
    assert reversed_bounds.value.field == "time_range.start_time"
    with pytest.raises(InvalidArgument) as unknown:
        resolve(usage_range(99), KOLKATA, now)
    assert unknown.value.field == "time_range.preset"
    default = resolve(usage_range(), KOLKATA, now)
    assert default == Range(utc(2026, 4, 30, 18, 30), now)
    with pytest.raises(InvalidArgument):
        preset_range(99, KOLKATA, now)


def test_period_starts_monthly_and_yearly() -> None:
    r = Range(utc(2025, 12, 15), utc(2026, 2, 2))
    assert [s.month for s in period_starts(r, "month", KOLKATA)] == [12, 1, 2]
    assert [s.year for s in period_starts(r, "year", KOLKATA)] == [2025, 2026]


def test_buckets_are_quarter_hours() -> None:
    t = utc(2026, 1, 1, 10, 7, 30)
    assert floor_bucket(t) == utc(2026, 1, 1, 10, 0)
    assert ceil_bucket(t) == utc(2026, 1, 1, 10, 15)
    assert ceil_bucket(utc(2026, 1, 1, 10, 15)) == utc(2026, 1, 1, 10, 15)
