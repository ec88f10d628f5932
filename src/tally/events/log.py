"""The export log's records: what a reader asks for, the page it gets, a tenant's partition.

The export log: each event belongs to one of `partitions` partitions (by tenant) and gets the
next offset of its partition inside the transaction that inserts it. Appending first locks the
partition's counter row and holds that lock until commit, so within a partition offsets are
handed out in commit order: once a reader sees offset n, every offset below n that will ever
exist is already visible to it. A reader's position is therefore one offset per partition, and
reading `offset > position` never skips an event, however late its transaction committed.
Offsets are data, so they survive backup, restore and failover unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from tally.events.model import StoredEvent


@dataclass(frozen=True, slots=True)
class ExportFilter:
    """What a reader asked for. `tenants` is the key's restriction, if any (None: all)."""

    tenant: str | None = None
    application: str | None = None
    type: str | None = None
    subject: str | None = None
    time_from: datetime | None = None
    time_to: datetime | None = None
    tenants: tuple[str, ...] | None = None

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
        text = "\x1f".join("\x00" if part is None else part for part in parts)
        return hashlib.sha256(text.encode()).digest()[:12]


@dataclass(slots=True)
class ExportPage:
    events: list[StoredEvent]
    positions: list[int]
    start: int  # the partition the next page begins with (round-robin; see store/plan.py)
    has_more: bool


@dataclass(frozen=True, slots=True)
class Totals:
    """Aggregates of the events matching a filter, computed by the database, exactly:
    `sum`, `min` and `max` are None when no event matches."""

    count: int
    sum: Decimal | None
    min: Decimal | None
    max: Decimal | None


def partition_of(tenant: str, partitions: int) -> int:
    """The export-log partition of a tenant: stable across processes, versions and hosts."""
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
