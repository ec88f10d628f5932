"""The production store on PostgreSQL (psycopg 3 with a connection pool).

Commits are durable (`synchronous_commit=on` is forced per connection). Appends lock the
touched partitions' counter rows in partition order first, so offsets follow commit order and
concurrent writers never deadlock on them; events go in with one set-based INSERT.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from tally.auth.records import ADMIN_SCOPES_LIKE, KeyRecord, refuse_last_admin
from tally.crypto.records import DataKey
from tally.errors import AlreadyExists, StoreUnavailable
from tally.events.log import ExportFilter, ExportPage
from tally.events.model import NewEvent, Outcome, StoredEvent
from tally.registry.audit import AuditEntry, AuditFilter, AuditRecord
from tally.registry.records import Application, Tenant
from tally.store import migrate, plan
from tally.store.audit import audit_where

_EVENT_COLUMNS = (
    "application, id, tenant, type, quantity, time, subject, unit, attributes, region, received_at"
)
_UNAVAILABLE = (psycopg.OperationalError, PoolTimeout, pg_errors.AdminShutdown)

Row = dict[str, Any]


def _event(row: Row) -> StoredEvent:
    return StoredEvent(
        application=row["application"],
        id=row["id"],
        tenant=row["tenant"],
        type=row["type"],
        quantity=row["quantity"],
        time=row["time"],
        subject=row["subject"],
        unit=row["unit"],
        sealed=bytes(row["attributes"]),
        region=row["region"],
        received_at=row["received_at"],
    )


def _data_key(row: Row) -> DataKey:
    return DataKey(
        tenant=row["tenant"],
        master_key_id=row["master_key_id"],
        wrapped=bytes(row["wrapped"]) if row["wrapped"] is not None else None,
        created_at=row["created_at"],
        shredded_at=row["shredded_at"],
    )


def _joined_data_key(row: Row) -> DataKey | None:
    if row["tenant"] is None:
        return None
    return _data_key({**row, "created_at": row["key_created_at"]})


def _key(row: Row) -> KeyRecord:
    tenants = json.loads(row["tenants"]) if row["tenants"] is not None else None
    return KeyRecord(
        id=row["id"],
        secret_hash=bytes(row["secret_hash"]),
        scopes=tuple(json.loads(row["scopes"])),
        application=row["application"],
        tenants=tuple(tenants) if tenants is not None else None,
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        rotated_from=row["rotated_from"],
        replaced_by=row["replaced_by"],
    )


def _audit_record(row: Row) -> AuditRecord:
    return AuditRecord(
        seq=row["seq"],
        at=row["at"],
        actor=row["actor"],
        action=row["action"],
        target=row["target"],
        details=json.loads(row["details"]),
        source=row["source"],
        request_id=row["request_id"],
    )


def _tenant(row: Row) -> Tenant:
    # By name: a row joined with tenant_keys holds more columns than a Tenant has.
    return Tenant(**{field.name: row[field.name] for field in fields(Tenant)})


def _application(row: Row) -> Application:
    return Application(**row)


def yoyo_url(url: str) -> str:
    """yoyo names the psycopg 3 driver in the URL scheme."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def libpq_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


class PostgresStore:
    """`EventStore` on PostgreSQL. See store/interface.py for the contract."""

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> None:
        self.url = libpq_url(url)
        self.partitions = 0
        self._pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
            self.url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=connect_timeout,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "connect_timeout": max(1, int(connect_timeout)),
                # Durability is not left to the server's default: a 2xx needs the WAL flushed.
                "options": "-c synchronous_commit=on",
                "application_name": "tally",
            },
            connection_class=psycopg.Connection[Row],
            check=ConnectionPool.check_connection,
        )

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Row]]:
        try:
            with self._pool.connection() as connection:
                yield connection
        except _UNAVAILABLE as error:
            raise StoreUnavailable("The PostgreSQL store cannot be reached.") from error

    @contextmanager
    def _transaction(self, *, snapshot: bool = False) -> Iterator[psycopg.Connection[Row]]:
        with self._connection() as connection, connection.transaction():
            if snapshot:
                connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield connection

    def open(self) -> PostgresStore:
        """Open the pool and read the partition count. Raises StoreUnavailable, from libpq's
        own error when the server cannot be reached or refuses the connection."""
        try:
            # One connection first, outside the pool: the pool retries in the background and
            # reports only a timeout, while libpq's reason ("connection refused", "database
            # … does not exist", "password authentication failed") is what an operator needs.
            psycopg.connect(self.url, connect_timeout=max(1, int(self._pool.timeout))).close()
            self._pool.open(wait=True, timeout=self._pool.timeout)
        except _UNAVAILABLE as error:
            raise StoreUnavailable("The PostgreSQL store cannot be reached.") from error
        try:
            with self._connection() as connection:
                row = connection.execute("SELECT count(*) AS n FROM log_partitions").fetchone()
        except pg_errors.UndefinedTable as error:
            raise StoreUnavailable(
                "The PostgreSQL store has no schema: run 'tally migrate'."
            ) from error
        assert row is not None  # noqa: S101 - count(*) always answers one row
        self.partitions = int(row["n"])
        return self

    def migrate(self) -> list[str]:
        try:
            applied = migrate.apply(yoyo_url(self.url), "postgresql")
        except psycopg.OperationalError as error:
            raise StoreUnavailable("The PostgreSQL store cannot be reached.") from error
        self.open()
        return applied

    def close(self) -> None:
        self._pool.close()

    def ping(self) -> None:
        with self._connection() as connection:
            connection.execute("SELECT 1")

    def secret(self, name: str) -> bytes:
        with self._transaction() as connection:
            connection.execute(
                "INSERT INTO secrets (name, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (name, secrets.token_bytes(32)),
            )
            row = connection.execute(
                "SELECT value FROM secrets WHERE name = %s", (name,)
            ).fetchone()
        assert row is not None  # noqa: S101 - inserted just above when missing
        return bytes(row["value"])

    # --- events ---------------------------------------------------------------------------

    def append(self, events: Sequence[NewEvent], *, received_at: datetime) -> list[Outcome]:
        if not events:
            return []
        touched = plan.partitions_of(events, self.partitions)
        with self._transaction() as connection:
            last = {
                row["partition"]: row["last_offset"]
                for row in connection.execute(
                    "SELECT partition, last_offset FROM log_partitions "
                    "WHERE partition = ANY(%s) ORDER BY partition FOR UPDATE",
                    (touched,),
                )
            }
            outcomes = plan.classify(events, self._stored(connection, events))
            fresh = [e for e, o in zip(events, outcomes, strict=True) if o is Outcome.ACCEPTED]
            if not fresh:
                return outcomes
            places, moved = plan.number(fresh, last, self.partitions)
            inserted = {
                (row["application"], row["id"])
                for row in connection.execute(
                    "INSERT INTO events (partition, log_offset, application, id, tenant, type, "
                    "quantity, time, subject, unit, attributes, region, received_at, digest) "
                    "SELECT * FROM unnest(%s::smallint[], %s::bigint[], %s::text[], %s::text[], "
                    "%s::text[], %s::text[], %s::numeric[], %s::timestamptz[], %s::text[], "
                    "%s::text[], %s::bytea[], %s::text[], %s::timestamptz[], %s::bytea[]) "
                    "ON CONFLICT (application, id) DO NOTHING RETURNING application, id",
                    (
                        [p for p, _ in places],
                        [o for _, o in places],
                        [e.application for e in fresh],
                        [e.id for e in fresh],
                        [e.tenant for e in fresh],
                        [e.type for e in fresh],
                        [e.quantity for e in fresh],
                        [e.time for e in fresh],
                        [e.subject for e in fresh],
                        [e.unit for e in fresh],
                        [e.attributes for e in fresh],
                        [e.region for e in fresh],
                        [received_at] * len(fresh),
                        [e.digest for e in fresh],
                    ),
                )
            }
            connection.execute(
                "UPDATE log_partitions SET last_offset = moved.last_offset "
                "FROM unnest(%s::smallint[], %s::bigint[]) AS moved(partition, last_offset) "
                "WHERE log_partitions.partition = moved.partition",
                (list(moved), list(moved.values())),
            )
            if len(inserted) < len(fresh):
                # Another writer, in another partition, stored one of these identities between
                # our check and our insert: judge those events against what it stored.
                lost = [e for e in events if e.key not in inserted]
                stored = self._stored(connection, lost)
                outcomes = [
                    plan.classify([e], stored)[0] if e.key not in inserted else o
                    for e, o in zip(events, outcomes, strict=True)
                ]
        return outcomes

    @staticmethod
    def _stored(
        connection: psycopg.Connection[Row], events: Sequence[NewEvent]
    ) -> dict[tuple[str, str], bytes]:
        rows = connection.execute(
            "SELECT application, id, digest FROM events WHERE (application, id) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([e.application for e in events], [e.id for e in events]),
        )
        return {(row["application"], row["id"]): bytes(row["digest"]) for row in rows}

    def read(
        self, *, positions: Sequence[int], start: int, filters: ExportFilter, limit: int
    ) -> ExportPage:
        where, params = _filter_sql(filters)
        sql = (
            f"SELECT log_offset, {_EVENT_COLUMNS} FROM events "
            f"WHERE partition = %s AND log_offset > %s{where} ORDER BY log_offset LIMIT %s"
        )
        with self._transaction(snapshot=True) as connection:

            def fetch(partition: int, after: int, count: int) -> list[tuple[int, StoredEvent]]:
                rows = connection.execute(sql, (partition, after, *params, count))
                return [(row["log_offset"], _event(row)) for row in rows]

            heads = {
                row["partition"]: row["last_offset"]
                for row in connection.execute("SELECT partition, last_offset FROM log_partitions")
            }
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
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE application = %s AND id = %s",
            (application, event_id),
        )
        return _event(row) if row is not None else None

    def find_events(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[StoredEvent, bytes]]:
        rows = self._all(
            f"SELECT {_EVENT_COLUMNS}, digest FROM events WHERE (application, id) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([application for application, _ in keys], [event_id for _, event_id in keys]),
        )
        return {
            (row["application"], row["id"]): (_event(row), bytes(row["digest"])) for row in rows
        }

    # --- tenant data keys -----------------------------------------------------------------

    def tenants_with_keys(self, ids: Sequence[str]) -> dict[str, tuple[Tenant, DataKey | None]]:
        rows = self._all(
            "SELECT t.*, k.tenant, k.master_key_id, k.wrapped, k.created_at AS key_created_at, "
            "k.shredded_at FROM tenants t LEFT JOIN tenant_keys k ON k.tenant = t.id "
            "WHERE t.id = ANY(%s)",
            (list(ids),),
        )
        return {row["id"]: (_tenant(row), _joined_data_key(row)) for row in rows}

    def add_data_key(self, key: DataKey) -> DataKey:
        with self._transaction() as connection:
            connection.execute(
                "INSERT INTO tenant_keys (tenant, master_key_id, wrapped, created_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (tenant) DO NOTHING",
                (key.tenant, key.master_key_id, key.wrapped, key.created_at),
            )
            row = connection.execute(
                "SELECT * FROM tenant_keys WHERE tenant = %s", (key.tenant,)
            ).fetchone()
        assert row is not None  # noqa: S101 - inserted just above when missing
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
        with self._connection() as connection:
            cursor = connection.execute(
                "UPDATE tenant_keys SET master_key_id = %s, wrapped = %s, rewrapped_at = %s "
                "WHERE tenant = %s AND master_key_id = %s AND shredded_at IS NULL",
                (master_key_id, wrapped, at, tenant, expected_master),
            )
            return cursor.rowcount == 1

    def shred_data_key(self, tenant: str, *, at: datetime, audit: AuditEntry | None = None) -> bool:
        with self._transaction() as connection:
            found = connection.execute(
                "SELECT 1 FROM tenants WHERE id = %s FOR SHARE", (tenant,)
            ).fetchone()
            if found is None:
                return False
            connection.execute(
                "INSERT INTO tenant_keys (tenant, created_at, shredded_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (tenant) DO UPDATE SET master_key_id = NULL, wrapped = NULL, "
                "shredded_at = excluded.shredded_at WHERE tenant_keys.shredded_at IS NULL",
                (tenant, at, at),
            )
            if audit is not None:
                _record(connection, audit)
        return True

    def data_keys_to_rewrap(self, newest: str, *, limit: int) -> list[DataKey]:
        rows = self._all(
            "SELECT * FROM tenant_keys WHERE wrapped IS NOT NULL AND master_key_id <> %s "
            "ORDER BY tenant LIMIT %s",
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
            "SELECT DISTINCT ON (master_key_id) * FROM tenant_keys WHERE wrapped IS NOT NULL "
            "ORDER BY master_key_id, tenant"
        )
        return [_data_key(row) for row in rows]

    # --- registration ---------------------------------------------------------------------

    def create_tenant(self, tenant: Tenant, *, audit: AuditEntry | None = None) -> None:
        self._insert(
            "INSERT INTO tenants (id, name, region, lateness_hours, created_at) "
            "VALUES (%s, %s, %s, %s, %s)",
            (tenant.id, tenant.name, tenant.region, tenant.lateness_hours, tenant.created_at),
            what="tenant",
            audit=audit,
        )

    def get_tenants(self, ids: Sequence[str]) -> dict[str, Tenant]:
        rows = self._all("SELECT * FROM tenants WHERE id = ANY(%s)", (list(ids),))
        return {row["id"]: _tenant(row) for row in rows}

    def update_tenant(self, old: Tenant, new: Tenant, *, audit: AuditEntry | None = None) -> bool:
        with self._transaction() as connection:
            cursor = connection.execute(
                "UPDATE tenants SET name = %s, lateness_hours = %s "
                "WHERE id = %s AND name IS NOT DISTINCT FROM %s AND lateness_hours = %s",
                (new.name, new.lateness_hours, old.id, old.name, old.lateness_hours),
            )
            if cursor.rowcount == 1 and audit is not None:
                _record(connection, audit)
            return cursor.rowcount == 1

    def list_tenants(self) -> list[Tenant]:
        return [_tenant(row) for row in self._all("SELECT * FROM tenants ORDER BY id")]

    def create_application(
        self, application: Application, *, audit: AuditEntry | None = None
    ) -> None:
        self._insert(
            "INSERT INTO applications (id, name, created_at) VALUES (%s, %s, %s)",
            (application.id, application.name, application.created_at),
            what="application",
            audit=audit,
        )

    def get_application(self, application_id: str) -> Application | None:
        row = self._one("SELECT * FROM applications WHERE id = %s", (application_id,))
        return _application(row) if row is not None else None

    def list_applications(self) -> list[Application]:
        return [_application(r) for r in self._all("SELECT * FROM applications ORDER BY id")]

    def create_key(self, key: KeyRecord, *, audit: AuditEntry | None = None) -> None:
        self._insert(*_key_insert(key), what="key", audit=audit)

    def find_key(self, secret_hash: bytes) -> KeyRecord | None:
        row = self._one("SELECT * FROM api_keys WHERE secret_hash = %s", (secret_hash,))
        return _key(row) if row is not None else None

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._one("SELECT * FROM api_keys WHERE id = %s", (key_id,))
        return _key(row) if row is not None else None

    def list_keys(self) -> list[KeyRecord]:
        return [_key(row) for row in self._all("SELECT * FROM api_keys ORDER BY created_at, id")]

    def revoke_key(
        self,
        key_id: str,
        *,
        at: datetime,
        audit: AuditEntry | None = None,
        keep_an_admin: bool = False,
    ) -> bool:
        with self._transaction() as connection:
            if keep_an_admin:
                # Every admin key's row, locked until commit: a concurrent revocation (or
                # rotation) of an admin key waits, then this one reads the rows as it left them.
                admins = connection.execute(
                    "SELECT * FROM api_keys WHERE scopes LIKE %s ORDER BY id FOR UPDATE",
                    (ADMIN_SCOPES_LIKE,),
                ).fetchall()
                refuse_last_admin(key_id, [_key(row) for row in admins], at)
            cursor = connection.execute(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, %s) WHERE id = %s",
                (at, key_id),
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
            with self._transaction() as connection:
                # The UPDATE locks the old key's row, so a concurrent rotation waits and then
                # finds replaced_by set: the chain cannot fork.
                cursor = connection.execute(
                    "UPDATE api_keys SET expires_at = %s, replaced_by = %s WHERE id = %s "
                    "AND revoked_at IS NULL AND replaced_by IS NULL "
                    "AND (expires_at IS NULL OR expires_at > %s)",
                    (old_expires_at, new.id, old_id, now),
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
        with self._connection() as connection:
            connection.execute(
                "UPDATE api_keys SET last_used_at = %s WHERE id = %s "
                "AND (last_used_at IS NULL OR last_used_at <= %s)",
                (at, key_id, at - every),
            )

    def count_keys(self) -> int:
        row = self._one("SELECT count(*) AS n FROM api_keys", ())
        return int(row["n"]) if row is not None else 0

    def _one(self, sql: str, params: Sequence[object]) -> Row | None:
        with self._connection() as connection:
            return connection.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        with self._connection() as connection:
            return connection.execute(sql, params).fetchall()

    def _insert(
        self,
        sql: str,
        params: Sequence[object],
        *,
        what: str,
        audit: AuditEntry | None = None,
    ) -> None:
        try:
            with self._transaction() as connection:
                connection.execute(sql, params)
                if audit is not None:
                    _record(connection, audit)
        except pg_errors.UniqueViolation as error:
            raise AlreadyExists(f"A {what} with this id exists already.") from error

    # --- audit log ------------------------------------------------------------------------

    def record_audit(self, entry: AuditEntry) -> None:
        with self._connection() as connection:
            _record(connection, entry)

    def list_audit(self, filters: AuditFilter, *, limit: int) -> list[AuditRecord]:
        where, params = audit_where(filters, mark="%s", time=lambda t: t)
        rows = self._all(
            f"SELECT * FROM audit_log WHERE {where} ORDER BY seq DESC LIMIT %s",
            (*params, limit),
        )
        return [_audit_record(row) for row in rows]


class _NotRotatable(Exception):
    """Rolls a rotation back when the old key cannot be rotated (see rotate_key)."""


def _key_insert(key: KeyRecord) -> tuple[str, tuple[object, ...]]:
    return (
        "INSERT INTO api_keys (id, secret_hash, scopes, application, tenants, created_at, "
        "expires_at, revoked_at, last_used_at, rotated_from, replaced_by) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            key.id,
            key.secret_hash,
            json.dumps(list(key.scopes)),
            key.application,
            json.dumps(list(key.tenants)) if key.tenants is not None else None,
            key.created_at,
            key.expires_at,
            key.revoked_at,
            key.last_used_at,
            key.rotated_from,
            key.replaced_by,
        ),
    )


def _record(connection: psycopg.Connection[Row], entry: AuditEntry) -> None:
    """Append `entry` inside the caller's transaction (so it commits with the action)."""
    connection.execute(
        "INSERT INTO audit_log (at, actor, action, target, details, source, request_id) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            entry.at,
            entry.actor,
            entry.action,
            entry.target,
            json.dumps(entry.details, sort_keys=True),
            entry.source,
            entry.request_id,
        ),
    )


def _filter_sql(filters: ExportFilter) -> tuple[str, list[object]]:
    return plan.filter_sql(
        filters, mark="%s", any_tenant="tenant = ANY(%s)", tenants=list, time=lambda t: t
    )
