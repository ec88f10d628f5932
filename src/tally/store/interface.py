"""The contract every store keeps. The conformance suite (tests/store/) runs it on each store.

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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from tally.errors import LastAdminKey
from tally.events.model import NewEvent, Outcome, StoredEvent


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str | None
    region: str
    lateness_hours: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class DataKey:
    """A tenant's data key as stored: wrapped by the master key `master_key_id`. Once the
    tenant is shredded, `wrapped` and `master_key_id` are None for good."""

    tenant: str
    master_key_id: str | None
    wrapped: bytes | None
    created_at: datetime
    shredded_at: datetime | None


@dataclass(frozen=True, slots=True)
class Application:
    id: str
    name: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key as stored: its SHA-256, never the secret."""

    id: str
    secret_hash: bytes
    scopes: tuple[str, ...]
    application: str | None
    tenants: tuple[str, ...] | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = None  # to within a minute (see auth/service.py)
    rotated_from: str | None = None  # the key this one replaced by rotation
    replaced_by: str | None = None  # the key that replaced this one by rotation

    def usable_at(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now` (a key in its rotation grace is usable)."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


# The admin scope as stored (auth.service.Scope.ADMIN; auth imports the store, not back).
ADMIN_SCOPE = "admin"
# Matches the JSON text of a scopes column that holds the admin scope (the same on both stores).
ADMIN_SCOPES_LIKE = f'%"{ADMIN_SCOPE}"%'


def refuse_last_admin(key_id: str, admins: Sequence[KeyRecord], now: datetime) -> None:
    """Raises LastAdminKey when revoking `key_id` at `now` would leave no admin key among
    `admins` (every admin key, read under the revocation's lock) that stays valid.

    A key that stays valid is neither revoked nor expired, and not retiring after a rotation
    (its replacement is the one that stays). Revoking a key that does not stay valid itself
    (revoked, expired, retiring, or not an admin key) takes nothing away and is never refused.
    """
    target = next((key for key in admins if key.id == key_id), None)
    if target is None or not _stays_valid(target, now):
        return
    if not any(key.id != key_id and _stays_valid(key, now) for key in admins):
        raise LastAdminKey


def _stays_valid(key: KeyRecord, now: datetime) -> bool:
    return ADMIN_SCOPE in key.scopes and key.usable_at(now) and key.replaced_by is None


JsonValue = str | int | bool | None | list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One administrative action, as recorded: who, what, when, from where.

    `details` is a small JSON object of non-secret facts (never a key's secret, never an
    attribute value). `actor` is a key id or `cli:<OS user>`; `source` the client's address,
    or `cli`.
    """

    at: datetime
    actor: str
    action: str
    target: str | None
    details: dict[str, JsonValue]
    source: str
    request_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord(AuditEntry):
    """An entry as listed: `seq` orders the log (higher is newer)."""

    seq: int


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which entries a listing wants; `before` is the cursor (a `seq`: older ones only)."""

    action: str | None = None
    actor: str | None = None
    since: datetime | None = None
    before: int | None = None


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


def partition_of(tenant: str, partitions: int) -> int:
    """The export-log partition of a tenant: stable across processes, versions and hosts."""
    return int.from_bytes(hashlib.sha256(tenant.encode()).digest()[:4], "big") % partitions


class EventStore(Protocol):
    """Where events, tenants, applications and keys live.

    Every method is one atomic unit; none leaves a transaction open for the caller. Methods
    raise `StoreUnavailable` when the database cannot be reached (safe to retry), and
    `AlreadyExists` where they say so. They never raise for a missing row: they return None.
    """

    partitions: int

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

    # --- events -------------------------------------------------------------------------

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
    ) -> ExportPage:
        """Up to `limit` events after `positions` matching `filters`, from one snapshot,
        reading partitions round-robin from `start`.

        The returned positions resume exactly after the last event returned; partitions read
        to their end move to the snapshot's end, so filtered polling stays cheap.
        """

    def get_event(self, application: str, event_id: str) -> StoredEvent | None: ...

    def find_events(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[StoredEvent, bytes]]:
        """The stored events among the identities `keys` (application, id), each with its
        content digest, in one query (attributes still sealed)."""

    # --- tenant data keys (crypto/tenant_keys.py) ------------------------------------------

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

    # --- registration -------------------------------------------------------------------

    # Administrative writes take `audit`: the entry is written in the same transaction as
    # the action, so the log holds an action if and only if it happened. None records
    # nothing (fixtures, start-up). A new administrative store method does the same.

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

    # --- audit log ----------------------------------------------------------------------

    def record_audit(self, entry: AuditEntry) -> None:
        """Append one entry on its own, for an action that is not one store transaction (or a
        refused attempt). An action that is one transaction passes `audit=` to it instead."""

    def list_audit(self, filters: AuditFilter, *, limit: int) -> list[AuditRecord]:
        """Up to `limit` entries matching `filters`, newest (highest `seq`) first."""
