"""Periods of a time zone (events/windows.py): wall-clock boundaries across daylight saving."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tally.errors import InvalidInput
from tally.events.windows import MAX_PERIODS, periods, zone

BERLIN = zone("Europe/Berlin")


def local(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_a_spring_day_in_berlin_has_23_hours_and_an_autumn_day_25() -> None:
    spring = periods(
        local("2026-03-29T00:00+01:00"), local("2026-03-30T00:00+02:00"), "hour", BERLIN
    )
    autumn = periods(
        local("2026-10-25T00:00+02:00"), local("2026-10-26T00:00+01:00"), "hour", BERLIN
    )

    assert len(spring) == 23
    assert len(autumn) == 25
    assert all(end - start == timedelta(hours=1) for start, end in spring + autumn)
    # 02:00 local happens twice in autumn: two distinct hours, one after the other.
    repeated = [s for s, _ in autumn if s.astimezone(BERLIN).hour == 2]
    assert repeated == [local("2026-10-25T02:00+02:00"), local("2026-10-25T02:00+01:00")]


def test_days_and_months_run_from_local_midnight_to_local_midnight() -> None:
    days = periods(local("2026-03-28T00:00+01:00"), local("2026-03-31T00:00+02:00"), "day", BERLIN)
    months = periods(
        local("2026-01-01T00:00+01:00"), local("2027-01-01T00:00+01:00"), "month", BERLIN
    )

    assert [end - start for start, end in days] == [
        timedelta(hours=24),
        timedelta(hours=23),
        timedelta(hours=24),
    ]
    assert len(months) == 12
    assert months[2] == (local("2026-03-01T00:00+01:00"), local("2026-04-01T00:00+02:00"))
    assert months[-1][1] == local("2027-01-01T00:00+01:00")


def test_periods_are_cut_to_the_range_and_an_empty_range_has_none() -> None:
    start, end = local("2026-03-28T10:30+01:00"), local("2026-03-29T06:00+01:00")

    assert periods(start, end, "day", BERLIN) == [
        (start, local("2026-03-29T00:00+01:00")),
        (local("2026-03-29T00:00+01:00"), end),
    ]
    assert periods(start, start, "day", BERLIN) == []


def test_a_zone_with_a_half_hour_offset_keeps_its_own_hour_marks() -> None:
    kolkata = zone("Asia/Kolkata")
    hours = periods(
        local("2026-03-01T00:10+05:30"), local("2026-03-01T03:00+05:30"), "hour", kolkata
    )

    assert [s.astimezone(kolkata).strftime("%H:%M") for s, _ in hours] == [
        "00:10",
        "01:00",
        "02:00",
    ]


@pytest.mark.parametrize(
    ("call", "parameter"),
    [
        (
            lambda: periods(local("2026-01-02T00:00Z"), local("2026-01-01T00:00Z"), "day", BERLIN),
            "from",
        ),
        (
            lambda: periods(local("2026-01-01T00:00Z"), local("2026-01-02T00:00Z"), "week", BERLIN),
            "period",
        ),
        (
            lambda: periods(
                local("2026-01-01T00:00Z"),
                local("2026-01-01T00:00Z") + timedelta(hours=MAX_PERIODS + 1),
                "hour",
                BERLIN,
            ),
            "period",
        ),
        (
            lambda: periods(local("2026-01-01T00:00Z"), local("9999-12-31T23:30Z"), "day", BERLIN),
            "to",
        ),
        (
            lambda: periods(
                local("0001-01-01T00:30Z"),
                local("0001-01-02T00:00Z"),
                "day",
                zone("America/New_York"),
            ),
            "from",
        ),
        (lambda: zone("Mars/Olympus_Mons"), "tz"),
        (lambda: zone("../../etc/passwd"), "tz"),
        (lambda: zone(""), "tz"),
    ],
)
def test_bad_input_names_its_parameter(call: object, parameter: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        call()  # type: ignore[operator]
    assert [e.parameter for e in raised.value.errors] == [parameter]


def test_exactly_the_maximum_number_of_periods_is_allowed() -> None:
    start = local("2026-01-01T00:00Z")
    assert (
        len(periods(start, start + timedelta(hours=MAX_PERIODS), "hour", zone("UTC")))
        == MAX_PERIODS
    )


def test_a_period_that_would_end_after_the_year_9999_is_cut_at_the_range() -> None:
    start, end = local("9999-12-01T00:00Z"), local("9999-12-31T22:00Z")

    assert periods(start, end, "month", BERLIN) == [(start, end)]
    assert periods(start, end, "day", zone("UTC"))[-1] == (local("9999-12-31T00:00Z"), end)
