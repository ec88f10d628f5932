"""Calendar periods (hours, days, months) of a time zone, as half-open UTC ranges.

Pure: no store, no clock. Reconciliation's periods come from here, and a usage window of the
same kind is the same range (one place decides what "a day in Europe/Berlin" is: midnight to
midnight on the wall clock, 23 or 25 hours long across a daylight-saving change).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tally.errors import FieldError, InvalidInput

PERIODS = ("hour", "day", "month")
MAX_PERIODS = 10_000
# IANA names are ASCII letters, digits and `/_+-`; anything else (a path, `..`) is refused
# before it reaches the zone database.
_LAST = datetime.max.replace(tzinfo=UTC)
_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9/_+-]{0,63}")


def _refuse(parameter: str, detail: str) -> InvalidInput:
    return InvalidInput(f"The {parameter} parameter {detail}.", [FieldError("", detail, parameter)])


def zone(name: str, parameter: str = "tz") -> ZoneInfo:
    """The IANA time zone `name` (`UTC`, `Europe/Berlin`). Raises InvalidInput naming
    `parameter` for a name the zone database does not know."""
    if not _ZONE_NAME.fullmatch(name) or ".." in name:
        raise _refuse(parameter, "is not an IANA time zone name")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _refuse(parameter, "is not an IANA time zone name") from None


def _utc(local: datetime) -> datetime:
    return local.astimezone(UTC)


def period_start(instant: datetime, period: str, tz: ZoneInfo) -> datetime:
    """The start (a UTC instant) of the `period` of `tz` that holds `instant`."""
    local = instant.astimezone(tz)
    if period == "hour":
        # replace() keeps `fold`, so the repeated hour of an autumn change stays the one
        # that holds `instant`.
        return _utc(local.replace(minute=0, second=0, microsecond=0))
    if period == "day":
        return _utc(datetime(local.year, local.month, local.day, tzinfo=tz))
    return _utc(datetime(local.year, local.month, 1, tzinfo=tz))


def _next(start: datetime, period: str, tz: ZoneInfo) -> datetime:
    if period == "hour":
        # One hour on, floored to the wall clock's hour (a zone whose offset changes by
        # half an hour stays on its own hour marks).
        following = start + timedelta(hours=1)
        floored = period_start(following, period, tz)
        return floored if floored > start else following
    local = start.astimezone(tz)
    if period == "day":
        day = local.date() + timedelta(days=1)
        return _utc(datetime(day.year, day.month, day.day, tzinfo=tz))
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return _utc(datetime(year, month, 1, tzinfo=tz))


def periods(
    start: datetime, end: datetime, period: str, tz: ZoneInfo
) -> list[tuple[datetime, datetime]]:
    """The `period`s of `tz` that meet `[start, end)`, each cut to that range, as UTC
    `(period_start, period_end)` pairs in order. An empty range has none.

    Raises InvalidInput naming `period` for an unknown period or more than MAX_PERIODS,
    naming `from` when `start` is after `end`, and naming `from` or `to` for an instant whose
    time in `tz` falls outside the years 1-9999.
    """
    if period not in PERIODS:
        raise _refuse("period", f"must be one of {', '.join(PERIODS)}")
    if start > end:
        raise _refuse("from", "must not be after to")
    for parameter, instant in (("from", start), ("to", end)):
        try:
            instant.astimezone(tz)
        except (OverflowError, ValueError):
            # 9999-12-31T23:30Z is in year 10000 in Berlin: no calendar period holds it.
            detail = "is beyond the calendar's years 1-9999 in this time zone"
            raise _refuse(parameter, detail) from None
    found: list[tuple[datetime, datetime]] = []
    try:
        cursor = period_start(start, period, tz)
    except (OverflowError, ValueError):
        raise _refuse("from", "is in a period that starts before the year 1") from None
    while cursor < end and start < end:
        try:
            following = _next(cursor, period, tz)
        except (OverflowError, ValueError):
            following = _LAST  # the period runs past year 9999: `end` cuts it
        if len(found) == MAX_PERIODS:
            raise _refuse("period", f"gives more than {MAX_PERIODS} periods in this range")
        found.append((max(cursor, start), min(following, end)))
        cursor = following
    return found
