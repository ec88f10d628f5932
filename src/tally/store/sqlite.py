"""The embedded store: one SQLite file in WAL mode with full synchronous commits.

All writes go through one connection that opens `BEGIN IMMEDIATE`, so writers are serialised by
SQLite's write lock and offsets are handed out in commit order. Readers borrow
connections from a small pool; WAL gives each read transaction a stable snapshot.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from tally.auth.records import ADMIN_SCOPES_LIKE, KeyRecord, refuse_last_admin
from tally.crypto.records import DataKey
from tally.errors import AlreadyExists, StoreUnavailable
from tally.events.log import ExportFilter, ExportPage
from tally.events.model import (
    NewEvent,
    Outcome,
    StoredEvent,
    format_decimal,
    format_time,
    parse_time,
)
from tally.registry.audit import AuditEntry, AuditFilter, AuditRecord
from tally.registry.records import Application, Tenant
from tally.store import migrate, plan
from tally.store.audit import audit_where

MIN_SQLITE = (3, 38, 0)

_EVENT_COLUMNS = (
    "application, id, tenant, type, quantity, time, subject, unit, attributes, region, received_at"
)


def _event(row: sqlite3.Row) -> StoredEvent:
    return StoredEvent(
        application=row["application"],
        id=row["id"],
        tenant=row["tenant"],
        type=row["type"],
        quantity=Decimal(row["quantity"]),
        time=parse_time(row["time"]),
        subject=row["subject"],
        unit=row["unit"],
        sealed=_sealed_from_text(row["attributes"]),
        region=row["region"],
        received_at=parse_time(row["received_at"]),
    )


def _sealed_from_text(text: str) -> bytes:
    # Plaintext JSON from before encryption at rest starts with '{'; base64 never does.
    return text.encode() if text.startswith("{") else base64.b64decode(text)


def _data_key(row: sqlite3.Row, *, created_at: str = "created_at") -> DataKey:
    return DataKey(
        tenant=row["tenant"],
        master_key_id=row["master_key_id"],
        wrapped=bytes(row["wrapped"]) if row["wrapped"] is not None else None,
        created_at=parse_time(row[created_at]),
        shredded_at=_time_or_none(row["shredded_at"]),
    )


def _joined_data_key(row: sqlite3.Row) -> DataKey | None:
    """The data key of a tenant row LEFT JOINed with tenant_keys (None: it has none)."""
    return None if row["tenant"] is None else _data_key(row, created_at="key_created_at")


def _time_or_none(text: str | None) -> datetime | None:
    return parse_time(text) if text is not None else None


def _key(row: sqlite3.Row) -> KeyRecord:
    tenants = json.loads(row["tenants"]) if row["tenants"] is not None else None
    return KeyRecord(
        id=row["id"],
        secret_hash=bytes(row["secret_hash"]),
        scopes=tuple(json.loads(row["scopes"])),
        application=row["application"],
        tenants=tuple(tenants) if tenants is not None else None,
        created_at=parse_time(row["created_at"]),
        expires_at=_time_or_none(row["expires_at"]),
        revoked_at=_time_or_none(row["revoked_at"]),
        last_used_at=_time_or_none(row["last_used_at"]),
        rotated_from=row["rotated_from"],
        replaced_by=row["replaced_by"],
    )


def _audit_record(row: sqlite3.Row) -> AuditRecord:
    return AuditRecord(
        seq=row["seq"],
        at=parse_time(row["at"]),
        actor=row["actor"],
        action=row["action"],
        target=row["target"],
        details=json.loads(row["details"]),
        source=row["source"],
        request_id=row["request_id"],
    )


def _tenant(row: sqlite3.Row) -> Tenant:
    return Tenant(
        id=row["id"],
        name=row["name"],
        region=row["region"],
        lateness_hours=row["lateness_hours"],
        created_at=parse_time(row["created_at"]),
    )


def create_owner_only(path: Path) -> None:
    """Make an empty database file at `path`, readable by its owner only, unless one exists.

    The file holds the cursor secret and the wrapped data keys. SQLite creates a missing file
    with the process umask (0644 by default), and gives its -wal and -shm files the mode of
    the database file, so making the file first, 0600, keeps all three owner-only. An
    existing file keeps its mode: an operator may have chosen it. Raises OSError.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(descriptor)


class SQLiteStore:
    """`EventStore` on one SQLite file. See store/interface.py for the contract."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        # Idle reader connections. A pool rather than one per thread: the server's worker
        # threads come and go, and per-thread connections would pile up open files.
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self.partitions = 0

    # --- connections ----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            create_owner_only(self.path)
            connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit returns only after the WAL is fsynced, so a 2xx survives power loss.
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as error:
            raise StoreUnavailable("The SQLite store cannot be opened.") from error
        with self._connections_lock:
            self._connections.append(connection)
        return connection

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """An idle connection (or a new one) for the duration of the block."""
        try:
            connection = self._idle.get_nowait()
        except queue.Empty:
            connection = self._connect()
        try:
            yield connection
        except sqlite3.OperationalError as error:
            raise StoreUnavailable("The SQLite store cannot be read.") from error
        finally:
            self._idle.put(connection)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; serialised in-process by a lock, across processes by SQLite.

        Any failure, COMMIT's included, rolls back so the writer connection is clean for the
        next transaction; an operational failure (busy, I/O, disk full) is StoreUnavailable.
        """
        with self._write_lock:
            if self._writer is None:
                self._writer = self._connect()
            connection = self._writer
            try:
                connection.execute("BEGIN IMMEDIATE")
                yield connection
                connection.execute("COMMIT")
            except BaseException as error:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                if isinstance(error, sqlite3.OperationalError):
                    raise StoreUnavailable("The SQLite store is busy or unwritable.") from error
                raise

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        with self._reading() as connection:
            connection.execute("BEGIN")
            try:
                yield connection
            finally:
                connection.execute("COMMIT")

    def _one(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Row | None:
        with self._reading() as connection:
            row: sqlite3.Row | None = connection.execute(sql, params).fetchone()
            return row

    def _all(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._reading() as connection:
            return connection.execute(sql, params).fetchall()

    def open(self) -> SQLiteStore:
        """Check the schema is there and read the partition count. Raises StoreUnavailable."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreUnavailable(
                f"SQLite {sqlite3.sqlite_version} is too old: Tally needs 3.38 or newer "
                "(JSON operators, UPDATE FROM, RETURNING)."
            )
        try:
            row = self._one("SELECT count(*) FROM log_partitions")
        except StoreUnavailable as error:
            if "no such table" not in str(error.__cause__):
                raise
            raise StoreUnavailable(
                "The SQLite store has no schema: run 'tally migrate'."
            ) from error.__cause__
        self.partitions = int(row[0]) if row is not None else 0
        return self

    def migrate(self) -> list[str]:
        try:
            create_owner_only(self.path)  # before yoyo's own connection can make it 0644
        except OSError as error:
            raise StoreUnavailable("The SQLite store cannot be created.") from error
        applied = migrate.apply(f"sqlite:///{self.path}", "sqlite")
        self.open()
        return applied

    def close(self) -> None:
        with self._write_lock, self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
            self._writer = None
            self._idle = queue.SimpleQueue()

    def ping(self) -> None:
        self._one("SELECT 1 FROM log_partitions LIMIT 1")

    def secret(self, name: str) -> bytes:
        with self._write() as connection:
            connection.execute(
                "INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (name, secrets.token_bytes(32)),
            )
            row = connection.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])

    # --- events ---------------------------------------------------------------------------

    def append(self, events: Sequence[NewEvent], *, received_at: datetime) -> list[Outcome]:
        if not events:
            return []
        keys = json.dumps([list(event.key) for event in events])
        touched = plan.partitions_of(events, self.partitions)
        with self._write() as connection:
            stored = {
                (row[0], row[1]): bytes.fromhex(row[2])
                for row in connection.execute(
                    "SELECT application, id, digest FROM events WHERE (application, id) IN "
                    "(SELECT value ->> 0, value ->> 1 FROM json_each(?))",
                    (keys,),
                )
            }
            outcomes = plan.classify(events, stored)
            fresh = [e for e, o in zip(events, outcomes, strict=True) if o is Outcome.ACCEPTED]
            if fresh:
                last = dict(
                    connection.execute(
                        "SELECT partition, last_offset FROM log_partitions WHERE partition IN "
                        "(SELECT value FROM json_each(?))",
                        (json.dumps(touched),),
                    ).fetchall()
                )
                places, moved = plan.number(fresh, last, self.partitions)
                received = format_time(received_at)
                rows = [
                    [
                        partition,
                        offset,
                        e.application,
                        e.id,
                        e.tenant,
                        e.type,
                        format_decimal(e.quantity),
                        format_time(e.time),
                        e.subject,
                        e.unit,
                        # Sealed bytes travel through JSON (json_each) as base64 text.
                        base64.b64encode(e.attributes).decode(),
                        e.region,
                        received,
                        e.digest.hex(),
                    ]
                    for e, (partition, offset) in zip(fresh, places, strict=True)
                ]
                connection.execute(
                    "INSERT INTO events (partition, log_offset, application, id, tenant, type, "
                    "quantity, time, subject, unit, attributes, region, received_at, digest) "
                    "SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, "
                    "value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, "
                    "value ->> 10, value ->> 11, value ->> 12, value ->> 13 "
                    "FROM json_each(?)",
                    (json.dumps(rows),),
                )
                connection.execute(
                    "UPDATE log_partitions SET last_offset = moved.value ->> 1 "
                    "FROM json_each(?) AS moved WHERE partition = moved.value ->> 0",
                    (json.dumps(list(moved.items())),),
                )
        return outcomes

    def read(
        self, *, positions: Sequence[int], start: int, filters: ExportFilter, limit: int
    ) -> ExportPage:
        where, params = _filter_sql(filters)
        sql = (
            f"SELECT log_offset, {_EVENT_COLUMNS} FROM events "
            f"WHERE partition = ? AND log_offset > ?{where} ORDER BY log_offset LIMIT ?"
        )
        with self._snapshot() as connection:

            def fetch(partition: int, after: int, count: int) -> list[tuple[int, StoredEvent]]:
                rows = connection.execute(sql, (partition, after, *params, count))
                return [(row["log_offset"], _event(row)) for row in rows]

            heads = dict(connection.execute("SELECT partition, last_offset FROM log_partitions"))
            return plan.read_page(
                fetch,
                heads=heads,
                positions=positions,
                start=start,
                wanted=plan.wanted_partitions(filters, self.partitions),
                limit=limit,
            )

    def get_event(self, application: str, event_id: str) -> StoredEvent | None:
        row = self._one(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE application = ? AND id = ?",
            (application, event_id),
        )
        return _event(row) if row is not None else None

    def find_events(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[StoredEvent, bytes]]:
        rows = self._all(
            f"SELECT {_EVENT_COLUMNS}, digest FROM events WHERE (application, id) IN "
            "(SELECT value ->> 0, value ->> 1 FROM json_each(?))",
            (json.dumps([list(key) for key in keys]),),
        )
        return {
            (row["application"], row["id"]): (_event(row), bytes.fromhex(row["digest"]))
            for row in rows
        }

    # --- tenant data keys -----------------------------------------------------------------

    def tenants_with_keys(self, ids: Sequence[str]) -> dict[str, tuple[Tenant, DataKey | None]]:
        rows = self._all(
            "SELECT t.*, k.tenant, k.master_key_id, k.wrapped, k.created_at AS key_created_at, "
            "k.shredded_at FROM tenants t LEFT JOIN tenant_keys k ON k.tenant = t.id "
            "WHERE t.id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(ids)),),
        )
        return {row["id"]: (_tenant(row), _joined_data_key(row)) for row in rows}

    def add_data_key(self, key: DataKey) -> DataKey:
        with self._write() as connection:
            connection.execute(
                "INSERT INTO tenant_keys (tenant, master_key_id, wrapped, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (tenant) DO NOTHING",
                (key.tenant, key.master_key_id, key.wrapped, format_time(key.created_at)),
            )
            row = connection.execute(
                "SELECT * FROM tenant_keys WHERE tenant = ?", (key.tenant,)
            ).fetchone()
        return _data_key(row)

    def rewrap_data_key(
        self,
        tenant: str,
        *,
        expected_master: str,
        master_key_id: str,
        wrapped: bytes,
        at: datetime,
    ) -> bool:
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE tenant_keys SET master_key_id = ?, wrapped = ?, rewrapped_at = ? "
                "WHERE tenant = ? AND master_key_id = ? AND shredded_at IS NULL",
                (master_key_id, wrapped, format_time(at), tenant, expected_master),
            )
            return cursor.rowcount == 1

    def shred_data_key(self, tenant: str, *, at: datetime, audit: AuditEntry | None = None) -> bool:
        with self._write() as connection:
            found = connection.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant,))
            if found.fetchone() is None:
                return False
            stamp = format_time(at)
            connection.execute(
                "INSERT INTO tenant_keys (tenant, created_at, shredded_at) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant) DO UPDATE SET master_key_id = NULL, wrapped = NULL, "
                "shredded_at = excluded.shredded_at WHERE tenant_keys.shredded_at IS NULL",
                (tenant, stamp, stamp),
            )
            if audit is not None:
                _record(connection, audit)
        return True

    def data_keys_to_rewrap(self, newest: str, *, limit: int) -> list[DataKey]:
        rows = self._all(
            "SELECT * FROM tenant_keys WHERE wrapped IS NOT NULL AND master_key_id != ? "
            "ORDER BY tenant LIMIT ?",
            (newest, limit),
        )
        return [_data_key(row) for row in rows]

    def data_key_usage(self) -> dict[str, int]:
        rows = self._all(
            "SELECT master_key_id, count(*) AS n FROM tenant_keys WHERE wrapped IS NOT NULL "
            "GROUP BY master_key_id"
        )
        return {row["master_key_id"]: int(row["n"]) for row in rows}

    def sample_data_keys(self) -> list[DataKey]:
        rows = self._all(
            "SELECT * FROM tenant_keys WHERE tenant IN (SELECT min(tenant) FROM tenant_keys "
            "WHERE wrapped IS NOT NULL GROUP BY master_key_id)"
        )
        return [_data_key(row) for row in rows]

    # --- registration ---------------------------------------------------------------------

    def create_tenant(self, tenant: Tenant, *, audit: AuditEntry | None = None) -> None:
        self._insert(
            "INSERT INTO tenants (id, name, region, lateness_hours, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                tenant.id,
                tenant.name,
                tenant.region,
                tenant.lateness_hours,
                format_time(tenant.created_at),
            ),
            what="tenant",
            audit=audit,
        )

    def get_tenants(self, ids: Sequence[str]) -> dict[str, Tenant]:
        rows = self._all(
            "SELECT * FROM tenants WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(ids)),),
        )
        return {row["id"]: _tenant(row) for row in rows}

    def update_tenant(self, old: Tenant, new: Tenant, *, audit: AuditEntry | None = None) -> bool:
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE tenants SET name = ?, lateness_hours = ? "
                "WHERE id = ? AND name IS ? AND lateness_hours = ?",
                (new.name, new.lateness_hours, old.id, old.name, old.lateness_hours),
            )
            if cursor.rowcount == 1 and audit is not None:
                _record(connection, audit)
            return cursor.rowcount == 1

    def list_tenants(self) -> list[Tenant]:
        return [_tenant(r) for r in self._all("SELECT * FROM tenants ORDER BY id")]

    def create_application(
        self, application: Application, *, audit: AuditEntry | None = None
    ) -> None:
        self._insert(
            "INSERT INTO applications (id, name, created_at) VALUES (?, ?, ?)",
            (application.id, application.name, format_time(application.created_at)),
            what="application",
            audit=audit,
        )

    def get_application(self, application_id: str) -> Application | None:
        row = self._one("SELECT * FROM applications WHERE id = ?", (application_id,))
        return _application(row) if row is not None else None

    def list_applications(self) -> list[Application]:
        rows = self._all("SELECT * FROM applications ORDER BY id")
        return [_application(row) for row in rows]

    def create_key(self, key: KeyRecord, *, audit: AuditEntry | None = None) -> None:
        self._insert(*_key_insert(key), what="key", audit=audit)

    def find_key(self, secret_hash: bytes) -> KeyRecord | None:
        row = self._one("SELECT * FROM api_keys WHERE secret_hash = ?", (secret_hash,))
        return _key(row) if row is not None else None

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return _key(row) if row is not None else None

    def list_keys(self) -> list[KeyRecord]:
        rows = self._all("SELECT * FROM api_keys ORDER BY created_at, id")
        return [_key(row) for row in rows]

    def revoke_key(
        self,
        key_id: str,
        *,
        at: datetime,
        audit: AuditEntry | None = None,
        keep_an_admin: bool = False,
    ) -> bool:
        # BEGIN IMMEDIATE holds SQLite's write lock from the check to the commit.
        with self._write() as connection:
            if keep_an_admin:
                admins = connection.execute(
                    "SELECT * FROM api_keys WHERE scopes LIKE ?", (ADMIN_SCOPES_LIKE,)
                )
                refuse_last_admin(key_id, [_key(row) for row in admins], at)
            cursor = connection.execute(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (format_time(at), key_id),
            )
            if cursor.rowcount == 1 and audit is not None:
                _record(connection, audit)
            return cursor.rowcount == 1

    def rotate_key(
        self,
        old_id: str,
        *,
        new: KeyRecord,
        old_expires_at: datetime,
        now: datetime,
        audit: AuditEntry | None = None,
    ) -> bool:
        try:
            with self._write() as connection:
                cursor = connection.execute(
                    "UPDATE api_keys SET expires_at = ?, replaced_by = ? WHERE id = ? "
                    "AND revoked_at IS NULL AND replaced_by IS NULL "
                    "AND (expires_at IS NULL OR expires_at > ?)",
                    (format_time(old_expires_at), new.id, old_id, format_time(now)),
                )
                if cursor.rowcount != 1:
                    raise _NotRotatable
                connection.execute(*_key_insert(new))
                if audit is not None:
                    _record(connection, audit)
        except _NotRotatable:
            return False
        return True

    def touch_key(self, key_id: str, *, at: datetime, every: timedelta) -> None:
        with self._write() as connection:
            connection.execute(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ? "
                "AND (last_used_at IS NULL OR last_used_at <= ?)",
                (format_time(at), key_id, format_time(at - every)),
            )

    def count_keys(self) -> int:
        row = self._one("SELECT count(*) FROM api_keys")
        return int(row[0]) if row is not None else 0

    # --- audit log ------------------------------------------------------------------------

    def record_audit(self, entry: AuditEntry) -> None:
        with self._write() as connection:
            _record(connection, entry)

    def list_audit(self, filters: AuditFilter, *, limit: int) -> list[AuditRecord]:
        where, params = audit_where(filters, mark="?", time=format_time)
        rows = self._all(
            f"SELECT * FROM audit_log WHERE {where} ORDER BY seq DESC LIMIT ?",
            (*params, limit),
        )
        return [_audit_record(row) for row in rows]

    def _insert(
        self,
        sql: str,
        params: Sequence[object],
        *,
        what: str,
        audit: AuditEntry | None = None,
    ) -> None:
        try:
            with self._write() as connection:
                connection.execute(sql, params)
                if audit is not None:
                    _record(connection, audit)
        except sqlite3.IntegrityError as error:
            raise AlreadyExists(f"A {what} with this id exists already.") from error


class _NotRotatable(Exception):
    """Rolls a rotation back when the old key cannot be rotated (see rotate_key)."""


def _key_insert(key: KeyRecord) -> tuple[str, tuple[object, ...]]:
    return (
        "INSERT INTO api_keys (id, secret_hash, scopes, application, tenants, created_at, "
        "expires_at, revoked_at, last_used_at, rotated_from, replaced_by) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key.id,
            key.secret_hash,
            json.dumps(list(key.scopes)),
            key.application,
            json.dumps(list(key.tenants)) if key.tenants is not None else None,
            format_time(key.created_at),
            format_time(key.expires_at) if key.expires_at else None,
            format_time(key.revoked_at) if key.revoked_at else None,
            format_time(key.last_used_at) if key.last_used_at else None,
            key.rotated_from,
            key.replaced_by,
        ),
    )


def _record(connection: sqlite3.Connection, entry: AuditEntry) -> None:
    """Append `entry` inside the caller's write transaction (so it commits with the action)."""
    connection.execute(
        "INSERT INTO audit_log (at, actor, action, target, details, source, request_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            format_time(entry.at),
            entry.actor,
            entry.action,
            entry.target,
            json.dumps(entry.details, sort_keys=True),
            entry.source,
            entry.request_id,
        ),
    )


def _application(row: sqlite3.Row) -> Application:
    return Application(id=row["id"], name=row["name"], created_at=parse_time(row["created_at"]))


def _filter_sql(filters: ExportFilter) -> tuple[str, list[object]]:
    return plan.filter_sql(
        filters,
        mark="?",
        any_tenant="tenant IN (SELECT value FROM json_each(?))",
        tenants=lambda ids: json.dumps(list(ids)),
        time=format_time,
    )
