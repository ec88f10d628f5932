"""The store's contracts, narrow by what they hold; the conformance suite (tests/store/) runs
them on each store.

One store object (SQLiteStore, PostgresStore: one connection pool) implements them all, but a
caller depends on the narrow contract it uses: the export service on `EventLog`, the
authenticator on `Registrations`, the tenant keys on `DataKeys` and `AuditLog`. The records
they hold live with their owners (auth/records.py, crypto/records.py, registry/records.py,
registry/audit.py, events/log.py), which never import the store.

Common to every method: it is one atomic unit and leaves no transaction open for the caller;
it raises `StoreUnavailable` when the database cannot be reached, is busy past its timeout or
refuses the statement (safe to retry), `AlreadyExists` where it says so, and never raises for a
missing row: it returns None (or False, or leaves it out of a mapping).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from tally.auth.records import KeyRecord
from tally.crypto.records import DataKey
from tally.events.log import (
    Entry,
    ExportFilter,
    ExportPage,
    LogEpoch,
    LogRow,
    PeriodFigures,
    Totals,
)
from tally.events.model import Cancellation, NewEvent, Outcome, StoredEvent
from tally.events.usage import Meter, TokenFill, UsageQuery, UsageRow
from tally.registry.audit import AuditEntry, AuditFilter, AuditRecord
from tally.registry.records import Application, Tenant
from tally.store.usage import KeyTokens, Label


class Lifecycle(Protocol):
    """Opening, checking and closing a store."""

    def migrate(self) -> list[str]:
        """Apply pending schema migrations; returns the ids applied."""

    def close(self) -> None: ...

    def ping(self) -> None:
        """Returns when the store answers a query; raises StoreUnavailable otherwise."""

    def secret(self, name: str) -> bytes:
        """A random 32-byte secret made once per store and kept in it (e.g. cursor signing).

        Kept in the database so that every replica, every restart and every restored backup
        agrees on it.
        """


class EventLog(Protocol):
    """The events and their export log (see events/log.py for the partitions and offsets).

    Events are never updated or deleted: a later fact about an event (a cancellation, say) is
    an entry of its own, appended and read through this contract.
    """

    partitions: int

    def append(self, events: Sequence[NewEvent], *, received_at: datetime) -> list[Outcome]:
        """Store a batch in one durable transaction; one outcome per input, in order.

        ACCEPTED: stored now. DUPLICATE: this identity is stored with the same content digest
        (also for a repeat inside `events`). CONFLICT: the identity holds other content;
        nothing is stored for it. The call returns only after the commit is durable; if it
        raises, the transaction was rolled back (or, when the connection died during COMMIT,
        its fate is unknown, which a retry resolves).
        """

    def read(
        self, *, positions: Sequence[int], start: int, filters: ExportFilter, limit: int
    ) -> ExportPage[Entry]:
        """Up to `limit` entries (events and cancellations, in log order within each
        partition) after `positions` matching `filters`, from one snapshot, reading
        partitions round-robin from `start`.

        The returned positions resume exactly after the last event returned; partitions read
        to their end move to the snapshot's end, so filtered polling stays cheap. The page
        also carries the log's epoch and each partition's head in that snapshot.
        """

    def read_rows(
        self, *, positions: Sequence[int], start: int, filters: ExportFilter, limit: int
    ) -> ExportPage[LogRow]:
        """`read`, with each entry a plain row (events/log.py LogRow) instead of an object:
        the export's own read, which writes rows out as they come."""

    def log_epochs(self) -> list[LogEpoch]:
        """The log's epochs, oldest first (there is always one: migration 0007 makes it)."""

    def renew_log_epoch(
        self, *, reason: str, at: datetime, audit: AuditEntry | None = None
    ) -> LogEpoch:
        """Start a new epoch whose base is every partition's head now (no append commits in
        between), after a restore rewound the log; returns it. `reason` is free text for
        operators (`tally epoch show`)."""

    def get_event(self, application: str, event_id: str) -> StoredEvent | None:
        """Returns None if no event has this identity."""

    def cancel(self, cancellation: Cancellation) -> tuple[Cancellation, bool]:
        """Append the cancellation of a stored event (its reason already sealed) as an
        export-log entry: the next offset of the event's partition, from the same counter and
        under the same lock as `append`, in one durable transaction. (stored, True) when it
        was appended now; (the one stored before, False), appending nothing, when the event
        is cancelled already. Nothing is ever updated: one cancellation per event, for good.

        The event must exist (the caller reads it first; events are never deleted), else the
        foreign key refuses the insert.
        """

    def get_cancellation(self, application: str, event_id: str) -> Cancellation | None:
        """The event's cancellation (reason still sealed); None if it is not cancelled."""

    def find_events(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[StoredEvent, bytes]]:
        """The stored events among the identities `keys` (application, id), each with its
        content digest, in one query (attributes still sealed)."""

    def totals(self, filters: ExportFilter) -> Totals:
        """Count, exact sum, least and greatest quantity of the events matching `filters`,
        computed by the database in one query (never through floating point). Usage and
        reconciliation figures build on the same filter and the same aggregates."""

    def period_figures(
        self, filters: ExportFilter, periods: Sequence[tuple[datetime, datetime]]
    ) -> list[PeriodFigures]:
        """The figures of each (tenant, type, period) among `periods` (half-open UTC ranges,
        `PeriodFigures.period` their index) that holds an event matching `filters`, in one
        grouped query, ordered by tenant, type and period. Cancelled events are counted and
        summed apart."""

    def read_in_time_order(
        self,
        tenant: str,
        *,
        time_from: datetime,
        time_to: datetime,
        after: tuple[datetime, str, str] | None,
        limit: int,
    ) -> list[tuple[StoredEvent, bool]]:
        """Up to `limit` of the tenant's events with `time_from <= time < time_to`, in
        (time, application, id) order after the key `after` (None: from the first), each with
        whether it is cancelled; attributes still sealed. One page of a walk in bounded
        memory, along the (tenant, time) index."""

    def usage(self, query: UsageQuery, *, key_tokens: KeyTokens, label: Label) -> list[UsageRow]:
        """The aggregate of each window and group of `query` that holds matching events
        (store/usage.py), computed by the database inside one snapshot, in no set order.
        Attribute groups go through `key_tokens` and `label` (see their types): an event
        whose tenant has no key token, or that lacks the attribute, groups as None. Raises
        StoreUnavailable."""


class TokenBackfill(Protocol):
    """Attribute tokens for the events stored before migration 0006 (`tally reindex`)."""

    def events_without_tokens(
        self, *, after: tuple[int, int], limit: int
    ) -> list[tuple[int, int, StoredEvent]]:
        """Up to `limit` events without attribute tokens after the log position `after`
        (partition, offset), in log order, each with its position."""

    def add_attribute_tokens(self, fills: Sequence[TokenFill]) -> int:
        """Set each event's tokens (only where none are set) and add their dictionary
        entries, in one transaction; how many events were filled."""


class Meters(Protocol):
    """Saved usage queries (services/usage.py), each audited with its change."""

    def create_meter(self, meter: Meter, *, audit: AuditEntry | None = None) -> None:
        """Raises AlreadyExists when the id is taken."""

    def get_meter(self, meter_id: str) -> Meter | None: ...

    def list_meters(self) -> list[Meter]:
        """Every meter, by id."""

    def delete_meter(self, meter_id: str, *, audit: AuditEntry | None = None) -> bool:
        """False (and nothing recorded) when there was no such meter."""


class DataKeys(Protocol):
    """Each tenant's data key, wrapped by a master key (crypto/tenant_keys.py)."""

    def tenants_with_keys(self, ids: Sequence[str]) -> dict[str, tuple[Tenant, DataKey | None]]:
        """The tenants among `ids` that exist, each with its data key (None: none yet), in
        one query: the write path's one lookup per request."""

    def add_data_key(self, key: DataKey) -> DataKey:
        """Store `key` unless its tenant has a data key already; returns the one stored."""

    def rewrap_data_key(
        self,
        tenant: str,
        *,
        expected_master: str,
        master_key_id: str,
        wrapped: bytes,
        at: datetime,
    ) -> bool:
        """Replace the wrapped key if it is still wrapped by `expected_master` (and not
        shredded); False, changing nothing, otherwise."""

    def shred_data_key(self, tenant: str, *, at: datetime, audit: AuditEntry | None = None) -> bool:
        """Destroy the tenant's data key for good (a tenant with none gets a shredded record,
        so none is ever made for it). False if there is no such tenant. Shredding twice keeps
        the first time."""

    def data_keys_to_rewrap(self, newest: str, *, limit: int) -> list[DataKey]:
        """Up to `limit` live data keys not wrapped by master key `newest`."""

    def data_key_usage(self) -> dict[str, int]:
        """Master key id -> how many live data keys it wraps."""

    def sample_data_keys(self) -> list[DataKey]:
        """One live data key per master key in use (to check a keyring against)."""


class Registrations(Protocol):
    """Tenants, applications and API keys.

    Administrative writes take `audit`: the entry is written in the same transaction as
    the action, so the log holds an action if and only if it happened. None records
    nothing (fixtures, start-up). A new administrative store method does the same.
    """

    def create_tenant(self, tenant: Tenant, *, audit: AuditEntry | None = None) -> None:
        """Raises AlreadyExists if the id is taken."""

    def get_tenants(self, ids: Sequence[str]) -> dict[str, Tenant]:
        """The tenants among `ids` that exist."""

    def update_tenant(self, old: Tenant, new: Tenant, *, audit: AuditEntry | None = None) -> bool:
        """Set the tenant's name and lateness window to `new`'s if its row still holds
        `old`'s (a compare-and-set: the audit entry's old values are then the true ones);
        False, changing nothing, when it does not or the tenant is gone."""

    def list_tenants(self) -> list[Tenant]: ...

    def create_application(
        self, application: Application, *, audit: AuditEntry | None = None
    ) -> None:
        """Raises AlreadyExists if the id is taken."""

    def get_application(self, application_id: str) -> Application | None: ...

    def list_applications(self) -> list[Application]: ...

    def create_key(self, key: KeyRecord, *, audit: AuditEntry | None = None) -> None:
        """Raises AlreadyExists if the id or the hash is taken."""

    def find_key(self, secret_hash: bytes) -> KeyRecord | None:
        """The key with this hash, revoked or expired ones included (the caller decides)."""

    def get_key(self, key_id: str) -> KeyRecord | None: ...

    def list_keys(self) -> list[KeyRecord]: ...

    def revoke_key(
        self,
        key_id: str,
        *,
        at: datetime,
        audit: AuditEntry | None = None,
        keep_an_admin: bool = False,
    ) -> bool:
        """Revoke at once; False if there is no such key. Revoking twice keeps the first time.

        With `keep_an_admin`, raises LastAdminKey, changing nothing, when no other admin key
        would stay valid (see `refuse_last_admin`): checked and revoked in one transaction
        that holds every admin key's row, so two concurrent revocations of the last two admin
        keys cannot both succeed.
        """

    def rotate_key(
        self,
        old_id: str,
        *,
        new: KeyRecord,
        old_expires_at: datetime,
        now: datetime,
        audit: AuditEntry | None = None,
    ) -> bool:
        """Atomically: store `new` (its `rotated_from` is `old_id`), point the old key at it
        (`replaced_by`) and set the old key's `expires_at` to `old_expires_at`.

        Returns False, changing nothing, unless the old key exists and at `now` is neither
        revoked, expired nor already replaced (so two concurrent rotations cannot fork the
        chain).
        """

    def touch_key(self, key_id: str, *, at: datetime, every: timedelta) -> None:
        """Set `last_used_at` to `at` unless it is already within `every` of it: a conditional
        UPDATE, so concurrent processes write a key's row at most about once per `every`."""

    def count_keys(self) -> int: ...


class AuditLog(Protocol):
    """The append-only log of administrative actions (registry/audit.py)."""

    def record_audit(self, entry: AuditEntry) -> None:
        """Append one entry on its own, for an action that is not one store transaction (or a
        refused attempt). An action that is one transaction passes `audit=` to it instead."""

    def list_audit(self, filters: AuditFilter, *, limit: int) -> list[AuditRecord]:
        """Up to `limit` entries matching `filters`, newest (highest `seq`) first."""


class IngestStore(EventLog, DataKeys, Protocol):
    """What services/ingest.py uses: the tenants' keys to seal with, the events to judge
    against (the append itself goes through store/groupcommit.py)."""


class ReconciliationStore(EventLog, DataKeys, Registrations, Protocol):
    """What services/reconciliation.py uses: the events, their tenants' keys (to open
    attributes for the digest) and lateness windows."""


class TenantKeyStore(DataKeys, AuditLog, Protocol):
    """What crypto/tenant_keys.py uses: the data keys, and the audit log for a rewrap."""


class RegistryStore(Registrations, DataKeys, AuditLog, Protocol):
    """What registry/service.py uses: registrations, a tenant's key state, the audit log."""


class UsageStore(EventLog, DataKeys, Registrations, Meters, AuditLog, Protocol):
    """What services/usage.py needs."""


class ReindexStore(TokenBackfill, DataKeys, Protocol):
    """What the backfill of attribute tokens needs."""


class EventStore(
    Lifecycle, EventLog, DataKeys, Registrations, AuditLog, Meters, TokenBackfill, Protocol
):
    """Every contract at once: what a store object implements and what start-up opens."""
