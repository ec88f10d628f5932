"""The export log's records: what a reader asks for, the page it gets, a tenant's partition.

The export log: each event belongs to one of `partitions` partitions (by tenant) and gets the
next offset of its partition inside the transaction that inserts it. Appending first locks the
partition's counter row and holds that lock until commit, so within a partition offsets are
handed out in commit order: once a reader sees offset n, every offset below n that will ever
exist is already visible to it. A reader's position is therefore one offset per partition, and
reading `offset > position` never skips an event, however late its transaction committed.
Offsets are data, so they survive backup, restore and failover unchanged.

A cancellation is an entry of its own in the same log: it takes the next offset of its event's
partition from the same counter, under the same lock, so one position per partition covers
both kinds and a reader sees events and cancellations in commit order.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from tally.events.model import Cancellation, StoredEvent, cancellation_json, event_json

KINDS = ("event", "cancellation")
"""The kinds of export-log entry: an event, and the cancellation of one (appended later)."""

Entry = StoredEvent | Cancellation

LogRow = tuple[Any, ...]
"""One export-log entry as the store reads it for the export, a plain row of the columns
below: what the export writes, without an object per entry (services/export.py). The
quantity and the times are text already as the export writes them (`format_decimal`,
`format_time`); `SEALED` is an event's sealed attributes or a cancellation's sealed reason
(bytes); a cancellation has None in the event's columns `TYPE` to `UNIT` and `REGION`."""

ROW_PARTITION, ROW_OFFSET, ROW_KIND, ROW_APPLICATION, ROW_ID, ROW_TENANT, ROW_TYPE = range(7)
ROW_QUANTITY, ROW_TIME, ROW_SUBJECT, ROW_UNIT, ROW_SEALED, ROW_REGION = range(7, 13)
ROW_RECEIVED_AT = 13
EVENT_ROW, CANCELLATION_ROW = "e", "c"  # the values of ROW_KIND

Opened = tuple[LogRow, str | None]
"""An export row and what was opened of it (services/export.py): an event's attributes as
JSON text, a cancellation's reason; None when its tenant was shredded."""


def row_json(row: LogRow, opened: str | None, tail: str = "") -> str:
    """The export representation of an opened row: the very text of `StoredEvent.to_json`
    and `Cancellation.to_json` for the same entry (`tail`: members after those, as in
    `event_json`)."""
    if row[ROW_KIND] == EVENT_ROW:
        return event_json(
            row[ROW_APPLICATION],
            row[ROW_ID],
            row[ROW_TENANT],
            type=row[ROW_TYPE],
            quantity=row[ROW_QUANTITY],
            time=row[ROW_TIME],
            subject=row[ROW_SUBJECT],
            unit=row[ROW_UNIT],
            region=row[ROW_REGION],
            received_at=row[ROW_RECEIVED_AT],
            attributes_json=opened,
            tail=tail,
        )
    return cancellation_json(
        row[ROW_APPLICATION], row[ROW_ID], row[ROW_TENANT], opened, row[ROW_RECEIVED_AT], tail=tail
    )


def row_fields(row: LogRow, opened: str | None) -> dict[str, Any]:
    """The export fields of an opened row by name (an export CSV row without its cursor):
    `attributes` as JSON text (None if shredded), `shredded` True or None."""
    shredded = True if opened is None else None
    if row[ROW_KIND] == EVENT_ROW:
        return {
            "kind": "event",
            "id": row[ROW_ID],
            "application": row[ROW_APPLICATION],
            "tenant": row[ROW_TENANT],
            "type": row[ROW_TYPE],
            "quantity": row[ROW_QUANTITY],
            "time": row[ROW_TIME],
            "subject": row[ROW_SUBJECT],
            "unit": row[ROW_UNIT],
            "region": row[ROW_REGION],
            "received_at": row[ROW_RECEIVED_AT],
            "attributes": opened,
            "shredded": shredded,
        }
    return {
        "kind": "cancellation",
        "application": row[ROW_APPLICATION],
        "id": row[ROW_ID],
        "tenant": row[ROW_TENANT],
        "reason": opened,
        "received_at": row[ROW_RECEIVED_AT],
        "shredded": shredded,
    }


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ExportFilter:
    """What a reader asked for. `tenants` is the key's restriction, if any (None: all).

    `kind` keeps one kind of entry (None: both). A cancellation matches the event filters
    (`type`, `subject`, `time_*`) through the event it cancels; `received_*` is the entry's
    own `received_at` (a cancellation's is when it was made).
    """

    tenant: str | None = None
    application: str | None = None
    type: str | None = None
    subject: str | None = None
    time_from: datetime | None = None
    time_to: datetime | None = None
    tenants: tuple[str, ...] | None = None
    kind: str | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None

    def digest(self) -> bytes:
        """Identifies the filter, so a cursor cannot be replayed under another one."""
        parts = [
            self.tenant,
            self.application,
            self.type,
            self.subject,
            self.time_from.isoformat() if self.time_from else None,
            self.time_to.isoformat() if self.time_to else None,
            ",".join(sorted(self.tenants)) if self.tenants is not None else None,
        ]
        later = [
            self.kind,
            self.received_from.isoformat() if self.received_from else None,
            self.received_to.isoformat() if self.received_to else None,
        ]
        # Only when set: a cursor issued before these filters existed keeps its digest.
        if any(part is not None for part in later):
            parts.extend(later)
        text = "\x1f".join("\x00" if part is None else part for part in parts)
        return hashlib.sha256(text.encode()).digest()[:12]


@dataclass(slots=True)
class ExportPage(Generic[T]):
    events: list[T]  # both kinds (Entry or LogRow), in log order within each partition
    positions: list[int]
    start: int  # the partition the next page begins with (round-robin; see store/plan.py)
    has_more: bool
    # Each entry's offset in its tenant's partition, parallel to `events`: what a cursor
    # after any one entry is made of (services/export.py).
    offsets: list[int] = field(default_factory=list)
    # Entries after the positions read from, in the partitions read, when it was read: how
    # far the reader was behind the log's head (metrics.py). It counts other tenants'
    # entries in those partitions too, so it is at most, not exactly, what the reader lacks.
    lag: int = 0
    # The log's epoch and each partition's last offset in the snapshot read: a cursor of
    # another epoch, or past a head, is one the log has been rewound under.
    epoch: bytes = b""
    heads: list[int] = field(default_factory=list)
    # From `read_rows`: the tenants of the page that are shredded in the same snapshot. A
    # tenant's data key never changes (only its wrapping does, and a shred destroys it), so
    # with these a reader knows which of the ciphers it holds it may still use.
    shredded: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class LogEpoch:
    """One epoch of the export log (migration 0007): a new one starts at every restore.

    `base` is each partition's last offset when it began: a reader of an earlier epoch and
    this log agree on everything up to it (empty for the log's first epoch, which has no
    earlier one). Its `id` goes into every cursor issued in it (events/cursor.py).
    """

    seq: int
    id: bytes
    started_at: datetime
    reason: str
    base: list[int]


def resume_positions(
    positions: list[int], epoch: bytes | None, history: list[LogEpoch], heads: list[int]
) -> list[int]:
    """Where a reader at `positions` of `epoch` (None: a cursor issued before epochs, taken
    to be of the first) resumes in the log whose epochs are `history` (oldest first) and
    whose partitions end at `heads`: at no partition past what every later epoch began with,
    nor past the log's end. It may see again entries it had read (a consumer deduplicates
    them by identity); it misses none. `positions` themselves when the reader is behind
    all of that: then it has read nothing the log lost, and continues as it is.
    """
    ids = [known.id for known in history]
    if epoch is None:
        later = history[1:]
    elif epoch in ids:
        later = history[ids.index(epoch) + 1 :]
    else:
        # An epoch this log never had: begun after the backup it was restored from, perhaps
        # on a branch of its own (a restore of another backup). Nothing is known to be
        # shared, so the reader starts over.
        return [0] * len(positions)
    resumed = [min(at, head) for at, head in zip(positions, heads, strict=True)]
    for known in later:
        if known.base:
            resumed = [min(at, base) for at, base in zip(resumed, known.base, strict=True)]
    return resumed


@dataclass(frozen=True, slots=True)
class Totals:
    """Aggregates of the events matching a filter, computed by the database, exactly:
    `sum`, `min` and `max` are None when no event matches."""

    count: int
    sum: Decimal | None
    min: Decimal | None
    max: Decimal | None


@functools.lru_cache(maxsize=65_536)
def partition_of(tenant: str, partitions: int) -> int:
    """The export-log partition of a tenant: stable across processes, versions and hosts.
    Remembered: every event appended and every export read asks it again."""
    return int.from_bytes(hashlib.sha256(tenant.encode()).digest()[:4], "big") % partitions


@dataclass(frozen=True, slots=True)
class PeriodFigures:
    """What the database counts of one (tenant, type, period): the events not cancelled
    (`count`, exact `sum`) and the cancelled ones apart, and the latest `received_at` of
    them all. Only (tenant, type, period) that hold an event have figures."""

    tenant: str
    type: str
    period: int  # the index of the period in the list the query was given
    count: int
    sum: Decimal
    cancelled_count: int
    cancelled_sum: Decimal
    last_received_at: datetime


EXPORT_CSV_COLUMNS = (
    "kind",
    "application",
    "id",
    "tenant",
    "type",
    "quantity",
    "time",
    "subject",
    "unit",
    "region",
    "received_at",
    "reason",
    "shredded",
    "attributes",
    "cursor",
)
"""The CSV columns of an export (the server's `text/csv` stream and `tally export`'s files):
every field of both kinds of entry (a field the kind lacks is empty), `attributes` as JSON
text, and the cursor that resumes after the row."""
