"""Usage queries' records: what a reader asks the database to aggregate, and the rows it gets.

A usage query (services/usage.py, GET /v1/usage and meters) buckets the events matching a
filter into windows (UTC instants, worked out in the reader's time zone by the service),
groups them and aggregates each group in the database (store/usage.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from tally.events.log import ExportFilter

AGGREGATIONS = ("sum", "count", "min", "max", "latest", "unique_count")
WINDOWS = ("minute", "hour", "day", "month", "none")
FIELDS = ("tenant", "type", "subject", "application")
ATTRIBUTE = "attributes."  # `attributes.KEY` groups (or counts) by the attribute KEY
UNIQUE_FIELDS = ("subject",)


def attribute_key(name: str) -> str | None:
    """KEY of a group-by or unique_of name `attributes.KEY`; None for a field's name."""
    return name[len(ATTRIBUTE) :] if name.startswith(ATTRIBUTE) else None


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """`filters` (its time range is the query's `[from, to)`), the `windows` [start, end) to
    bucket into (UTC, in order, inside the range), the `aggregation` (one of AGGREGATIONS),
    `group_by` (FIELDS or `attributes.KEY`) and `unique_of` (for unique_count)."""

    filters: ExportFilter
    windows: tuple[tuple[datetime, datetime], ...]
    aggregation: str
    group_by: tuple[str, ...] = ()
    unique_of: str | None = None

    def attribute_keys(self) -> list[str]:
        """The attribute keys the query groups or counts by, each once, in order."""
        names = [*self.group_by, *([self.unique_of] if self.unique_of else [])]
        keys = [key for name in names if (key := attribute_key(name)) is not None]
        return list(dict.fromkeys(keys))


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One window and group. `group` holds one value per `group_by` name: the field's text,
    or for an attribute the label the caller gave its value (see `EventLog.usage`), None when
    absent. `value` is a Decimal for sum, min, max and latest, an int for the counts."""

    window_start: datetime
    window_end: datetime
    group: tuple[object, ...]
    value: Decimal | int


@dataclass(frozen=True, slots=True)
class Meter:
    """A saved usage query (POST /v1/meters): `spec` is its definition as the API reads it
    (`type`, `aggregation`, `group_by`, `filters`, `unit`), kept as canonical JSON."""

    id: str
    spec: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TokenFill:
    """The attribute tokens of an event stored before they existed (`tally reindex`), and
    the sealed dictionary entries (value token, sealed value) that go with them."""

    application: str
    id: str
    tenant: str
    attribute_tokens: str
    dictionary: tuple[tuple[str, bytes], ...]
