"""A backup's manifest: what the store held at the snapshot, in figures a billing system and
an operator can check.

Per table its row count; per tenant, event type and calendar month (UTC) what
`GET /v1/reconciliation?period=month&tz=UTC` answers for it: the events not cancelled (count,
exact sum), the cancelled ones (count, sum), the latest arrival, and the reconciliation digest
(events/digest.py, over the opened events, exactly as services/reconciliation.py computes
it); the export log's high-water mark per partition (`log_partitions.last_offset`); and the
log's epoch where the store has one.

`Book` computes the per-month figures from rows, one at a time in constant memory (one
accumulator per tenant, type and month), so the backup, `tally backup verify` and the check
after a restore all count the same way.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from tally.crypto import sealing
from tally.crypto.keyring import Keyring
from tally.crypto.sealing import SealBroken, TenantCipher
from tally.events import windows
from tally.events.digest import DigestAccumulator
from tally.events.model import EXACT, StoredEvent, format_decimal, format_time, parse_time
from tally.services.reconciliation import digest_fields
from tally.store.snapshot import Column, MonthFigures, Row

# A manifest names at most this many differences; the rest are counted.
SHOWN = 20


@dataclass(slots=True)
class Period:
    """One (tenant, type, month) of the manifest, with reconciliation's names."""

    tenant: str
    type: str
    period_start: str
    period_end: str
    count: int
    sum: str
    cancelled_count: int
    cancelled_sum: str
    last_received_at: str
    digest: str | None = None  # None: from the database's figures, before the rows are read

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.tenant, self.type, self.period_start)


@dataclass(slots=True)
class Figures:
    """What a backup's rows add up to (see the module docstring)."""

    tables: dict[str, int] = field(default_factory=dict)
    periods: list[Period] = field(default_factory=list)
    high_water_marks: list[int] = field(default_factory=list)
    log_epoch: str | None = None
    # Cancelled events, by identity: how many, and an additive digest of their identities
    # (events/digest.py's accumulator), checked against the cancellations' own rows.
    cancelled_events: int = 0
    cancelled_digest: str = DigestAccumulator().hexdigest()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where and when a backup was taken: the first record of its content, and the head of
    its manifest."""

    backup_id: str
    created_at: str
    tally_version: str
    store: str  # the kind it came from: sqlite or postgresql
    schema_version: str | None  # the last migration applied
    migrations: list[str]

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @staticmethod
    def from_json(document: Mapping[str, Any]) -> Origin:
        """Raises KeyError, TypeError or ValueError for a document that is not one."""
        version = document["schema_version"]
        return Origin(
            backup_id=_text(document["backup_id"]),
            created_at=_text(document["created_at"]),
            tally_version=_text(document["tally_version"]),
            store=_text(document["store"]),
            schema_version=None if version is None else _text(version),
            migrations=[_text(m) for m in document["migrations"]],
        )


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not text")
    return value


@dataclass(frozen=True, slots=True)
class Manifest:
    origin: Origin
    figures: Figures

    def to_json(self) -> dict[str, Any]:
        return {**self.origin.to_json(), **asdict(self.figures)}

    @staticmethod
    def from_json(document: Mapping[str, Any]) -> Manifest:
        """Raises KeyError, TypeError or ValueError for a document that is not a manifest."""
        figures = Figures(
            tables={str(name): int(n) for name, n in document["tables"].items()},
            periods=[Period(**period) for period in document["periods"]],
            high_water_marks=[int(n) for n in document["high_water_marks"]],
            log_epoch=document["log_epoch"],
            cancelled_events=int(document["cancelled_events"]),
            cancelled_digest=_text(document["cancelled_digest"]),
        )
        return Manifest(origin=Origin.from_json(document), figures=figures)

    @property
    def backup_id(self) -> str:
        return self.origin.backup_id


def month_bounds(month: str) -> tuple[str, str]:
    """The UTC range of a calendar month `YYYY-MM`, as RFC 3339 text."""
    start = datetime(int(month[:4]), int(month[5:7]), 1, tzinfo=UTC)
    # The first period of a range that holds the whole month is the month itself.
    _, end = windows.periods(start, start + timedelta(days=32), "month", ZoneInfo("UTC"))[0]
    return format_time(start), format_time(end)


def from_database(figures: Sequence[MonthFigures]) -> list[Period]:
    """The database's own counts and sums (store/snapshot.py) as manifest periods."""
    return sorted((_period(found) for found in figures), key=lambda period: period.key)


def _period(found: MonthFigures, digest: str | None = None) -> Period:
    start, end = month_bounds(found.month)
    return Period(
        tenant=found.tenant,
        type=found.type,
        period_start=start,
        period_end=end,
        count=found.count,
        sum=format_decimal(found.sum),
        cancelled_count=found.cancelled_count,
        cancelled_sum=format_decimal(found.cancelled_sum),
        last_received_at=found.last_received_at,
        digest=digest,
    )


class DataKeys:
    """The tenants' data keys of one backup (its tenant_keys rows), opened with the keyring on
    first use: what opens the attributes for the digests."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._wrapped: dict[str, tuple[str | None, bytes | None]] = {}
        self._ciphers: dict[str, TenantCipher | None] = {}

    def add(self, tenant: str, master_key_id: str | None, wrapped: bytes | None) -> None:
        self._wrapped[tenant] = (master_key_id, wrapped)

    def open(self, event: StoredEvent) -> StoredEvent:
        """`event` with its attributes opened, or marked shredded. Raises SealBroken when they
        do not open (altered, or sealed under a key this keyring does not hold)."""
        if event.tenant not in self._ciphers:
            self._ciphers[event.tenant] = self._cipher(event.tenant)
        cipher = self._ciphers[event.tenant]
        if cipher is not None:
            event.attributes_json = cipher.open(
                application=event.application, event_id=event.id, sealed=event.sealed
            )
        elif event.tenant in self._wrapped:  # shredded
            event.shredded = True
        elif event.sealed[:1] == b"{":  # stored in clear before encryption at rest
            event.attributes_json = event.sealed.decode()
        else:
            raise SealBroken("An event's attributes are sealed, but its tenant has no data key.")
        return event

    def _cipher(self, tenant: str) -> TenantCipher | None:
        master_key_id, wrapped = self._wrapped.get(tenant, (None, None))
        if wrapped is None:
            return None
        master = self._keyring.get(master_key_id or "")
        if master is None:
            raise SealBroken(
                f"Tenant {tenant}'s data key is wrapped by master key '{master_key_id}', which "
                f"keyring {self._keyring.source} does not hold."
            )
        return TenantCipher(tenant, sealing.unwrap(master, tenant=tenant, wrapped=wrapped))


class _Month:
    __slots__ = ("cancelled_count", "cancelled_sum", "count", "digest", "last", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = Decimal(0)
        self.cancelled_count = 0
        self.cancelled_sum = Decimal(0)
        self.last = ""
        self.digest = DigestAccumulator()


def _identity(application: Any, event_id: Any) -> bytes:
    return hashlib.sha256(json.dumps([application, event_id]).encode()).digest()


class Book:
    """The figures of events and cancellations fed one row at a time (neutral rows of the
    columns given), in memory bounded by the number of (tenant, type, month)."""

    def __init__(self, keys: DataKeys) -> None:
        self._keys = keys
        self._months: dict[tuple[str, str, str], _Month] = {}
        self._flagged = DigestAccumulator()  # events flagged cancelled
        self._cancellations = DigestAccumulator()  # cancellation rows
        self._event_at: dict[str, int] = {}

    def events(self, columns: Sequence[Column]) -> None:
        """The columns of the event rows to come."""
        self._event_at = {name: n for n, (name, _) in enumerate(columns)}

    def add_event(self, row: Row, cancelled: bool) -> None:
        """Count one event row (raises SealBroken when its attributes do not open)."""
        at = self._event_at
        event = StoredEvent(
            application=str(row[at["application"]]),
            id=str(row[at["id"]]),
            tenant=str(row[at["tenant"]]),
            type=str(row[at["type"]]),
            quantity=Decimal(str(row[at["quantity"]])),
            time=parse_time(str(row[at["time"]])),
            subject=_optional(row[at["subject"]]),
            unit=_optional(row[at["unit"]]),
            sealed=base64.b64decode(str(row[at["attributes"]])),
            region=str(row[at["region"]]),
            received_at=parse_time(str(row[at["received_at"]])),
        )
        month = self._months.setdefault(
            (event.tenant, event.type, str(row[at["time"]])[:7]), _Month()
        )
        if cancelled:
            month.cancelled_count += 1
            month.cancelled_sum = EXACT.add(month.cancelled_sum, event.quantity)
            self._flagged.add_hash(_identity(event.application, event.id))
        else:
            month.count += 1
            month.sum = EXACT.add(month.sum, event.quantity)
        month.last = max(month.last, str(row[at["received_at"]]))
        month.digest.add(digest_fields(self._keys.open(event)), cancelled)

    def add_cancellation(self, application: Any, event_id: Any) -> None:
        self._cancellations.add_hash(_identity(application, event_id))

    def periods(self) -> list[Period]:
        periods = [
            _period(
                MonthFigures(
                    tenant=tenant,
                    type=type_,
                    month=month,
                    count=found.count,
                    sum=found.sum,
                    cancelled_count=found.cancelled_count,
                    cancelled_sum=found.cancelled_sum,
                    last_received_at=found.last,
                ),
                found.digest.hexdigest(),
            )
            for (tenant, type_, month), found in self._months.items()
        ]
        return sorted(periods, key=lambda period: period.key)

    @property
    def cancelled(self) -> tuple[int, str]:
        """(how many events were flagged cancelled, the digest of their identities)."""
        return self._flagged.count, self._flagged.hexdigest()

    @property
    def cancellation_rows(self) -> tuple[int, str]:
        """(how many cancellation rows were counted, the digest of their identities)."""
        return self._cancellations.count, self._cancellations.hexdigest()


def _optional(value: Any) -> str | None:
    return None if value is None else str(value)


def differences(expected: Figures, found: Figures, *, digests: bool = True) -> list[str]:
    """What differs between two sets of figures, one line each (at most SHOWN, then a count):
    empty when they agree. Without `digests`, the periods' digests are not compared (figures
    from the database's aggregates have none)."""
    lines: list[str] = []
    for table in sorted(set(expected.tables) | set(found.tables)):
        want, got = expected.tables.get(table), found.tables.get(table)
        if want != got:
            lines.append(f"table {table}: {_n(want)} rows in the manifest, {_n(got)} found")
    wanted = {period.key: period for period in expected.periods}
    seen = {period.key: period for period in found.periods}
    for key in sorted(set(wanted) | set(seen)):
        tenant, type_, start = key
        where = f"tenant {tenant}, type {type_}, month of {start[:7]}"
        want_period, got_period = wanted.get(key), seen.get(key)
        if want_period is None or got_period is None:
            lines.append(f"{where}: {'not in the manifest' if want_period is None else 'missing'}")
            continue
        for name in ("count", "sum", "cancelled_count", "cancelled_sum", "last_received_at"):
            want_value, got_value = getattr(want_period, name), getattr(got_period, name)
            if want_value != got_value:
                lines.append(f"{where}: {name} {want_value} in the manifest, {got_value} found")
        if digests and want_period.digest != got_period.digest:
            lines.append(f"{where}: the reconciliation digest differs")
    if expected.high_water_marks != found.high_water_marks:
        lines.append(
            f"export log high-water marks: {expected.high_water_marks} in the manifest, "
            f"{found.high_water_marks} found"
        )
    if expected.log_epoch != found.log_epoch:
        lines.append(f"log epoch: {expected.log_epoch} in the manifest, {found.log_epoch} found")
    if (expected.cancelled_events, expected.cancelled_digest) != (
        found.cancelled_events,
        found.cancelled_digest,
    ):
        lines.append(
            f"cancelled events: {expected.cancelled_events} in the manifest, "
            f"{found.cancelled_events} found (or other ones)"
        )
    if len(lines) > SHOWN:
        lines = [*lines[:SHOWN], f"and {len(lines) - SHOWN} more differences"]
    return lines


def _n(value: int | None) -> str:
    return "no" if value is None else str(value)
