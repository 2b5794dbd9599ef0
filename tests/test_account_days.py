"""Limits stated in days count the account's calendar days, in its time zone: a week
across the end of daylight saving time in Los Angeles is 169 hours, and is one week."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tally_client import InvalidArgument, TallyClient
from tally_service.ranges import Range, add_days, within_days

LA = ZoneInfo("America/Los_Angeles")


def local(year: int, month: int, day: int) -> datetime:
    """Midnight of that day in Los Angeles, as a UTC instant."""
    return datetime(year, month, day, tzinfo=LA).astimezone(UTC)


def test_add_days_counts_local_days() -> None:
    start = local(2026, 10, 29)
    assert add_days(start, 7, LA) == local(2026, 11, 5)
    assert add_days(start, 7, LA) - start == timedelta(days=7, hours=1)
    assert add_days(local(2026, 3, 8), -1, LA) == local(2026, 3, 7)
    assert within_days(Range(start, local(2026, 11, 5)), 7, LA)
    assert not within_days(Range(start, local(2026, 11, 5) + timedelta(seconds=1)), 7, LA)
    # A wall time in the spring gap maps to the instant after it.
    gap = add_days(datetime(2026, 3, 7, 2, 30, tzinfo=LA), 1, LA)
    assert gap.astimezone(LA).hour == 3


def test_list_and_export_limits_are_account_days(client: TallyClient, account_id: str) -> None:
    client.create_account(account_id, time_zone="America/Los_Angeles")
    week_start, week_end = local(2026, 10, 29), local(2026, 11, 5)
    assert week_end - week_start > timedelta(days=7)  # 25-hour 1 November
    client.list_usage_events(account_id, start_time=week_start, end_time=week_end)
    with pytest.raises(InvalidArgument) as refused:
        client.list_usage_events(
            account_id, start_time=week_start, end_time=week_end + timedelta(seconds=1)
        )
    assert refused.value.field_violations[0][0] == "time_range.end_time"
    # 366 days from 1 November 2025 cross three DST changes: 366 x 24 + 1 hours.
    year_start, year_end = local(2025, 11, 1), local(2026, 11, 2)
    assert year_end - year_start == timedelta(days=366, hours=1)
    assert b"".join(
        client.export_usage_report(
            account_id, format="csv", start_time=year_start, end_time=year_end
        )
    )
    with pytest.raises(InvalidArgument):
        list(
            client.export_usage_report(
                account_id,
                format="csv",
                start_time=year_start,
                end_time=year_end + timedelta(seconds=1),
            )
        )
