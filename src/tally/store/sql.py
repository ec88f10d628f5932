"""The store's SQL, written once over a dialect (store/dialect.py), and the runner it goes through.

`SQLStore` implements every contract of store/interface.py but the append, whose locking and
bulk insert genuinely differ: SQLiteStore and PostgresStore subclass it and add the append,
connection management and opening. A query is written here once, with `?` placeholders,
through a `Session` (one connection inside one read or write):

    with self._read() as session:                       # or self._write() to change rows
        tenants, params = self.dialect.in_list("tenant", ids)
        rows = session.all(f"SELECT ... FROM events WHERE {tenants}", params)

Values are bound through the dialect's adapters (`time`, `in_list`, …) and read back through
its readers (`read_time`, `read_decimal`, …).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from tally.auth.records import ADMIN_SCOPES_LIKE, KeyRecord, refuse_last_admin
from tally.crypto.records import DataKey
from tally.errors import AlreadyExists
from tally.events.log import (
    CANCELLATION_ROW,
    EVENT_ROW,
    ROW_OFFSET,
    ROW_QUANTITY,
    ROW_SEALED,
    ROW_TENANT,
    Entry,
    ExportFilter,
    ExportPage,
    LogEpoch,
    LogRow,
    PeriodFigures,
    Totals,
    partition_of,
)
from tally.events.model import Cancellation, NewEvent, StoredEvent, parse_time
from tally.events.usage import Meter, TokenFill, UsageQuery, UsageRow
from tally.registry.audit import AuditEntry, AuditFilter, AuditRecord
from tally.registry.records import Application, Tenant
from tally.store import plan
from tally.store import usage as usage_sql
from tally.store.audit import audit_where
from tally.store.dialect import Dialect
from tally.store.usage import KeyTokens, Label

EVENT_COLUMNS = (
    "application, id, tenant, type, quantity, time, subject, unit, attributes, region, received_at"
)
CANCELLATION_COLUMNS = "application, id, tenant, reason, received_at"
_EPOCH_COLUMNS = "seq, epoch, started_at, reason, base"
# Each partition's head and the log's current epoch, in one round trip (every page reads it).
_LOG_STATE = (
    "SELECT partition, last_offset, "
    "(SELECT epoch FROM log_epochs ORDER BY seq DESC LIMIT 1) AS epoch "
    "FROM log_partitions ORDER BY partition"
)


def _entry_of(row: LogRow) -> Entry:
    """The entry of an export row (events/log.py LogRow)."""
    _, _, kind, application, event_id, tenant, type_, quantity, time, subject = row[:10]
    unit, sealed, region, received_at = row[10:]
    identity = (application, event_id, tenant)
    if kind == CANCELLATION_ROW:
        return Cancellation(*identity, sealed_reason=sealed, received_at=parse_time(received_at))
    return StoredEvent(
        *identity,
        type=type_,
        quantity=Decimal(quantity),
        time=parse_time(time),
        subject=subject,
        unit=unit,
        sealed=sealed,
        region=region,
        received_at=parse_time(received_at),
    )


# Where a tenant's events in time order resume: (time, application, id).
TimeKey = tuple[datetime, str, str]


class Row(Protocol):
    """A result row, read by column name (sqlite3.Row and psycopg's dict rows both are)."""

    def __getitem__(self, key: str, /) -> Any: ...


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Connection(Protocol):
    def execute(self, query: str, params: Sequence[object], /) -> _Cursor: ...


_ROWS_PER_INSERT = 256  # 15 columns: 3,840 parameters, well within SQLite's 32,766


class Session:
    """One connection inside one read or write: runs `?`-placeholder SQL through the dialect."""

    def __init__(self, connection: Any, dialect: Dialect) -> None:
        self._connection: _Connection = connection
        self._dialect = dialect

    def all(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return self._connection.execute(self._dialect.sql(sql), params).fetchall()

    def one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        row: Row | None = self._connection.execute(self._dialect.sql(sql), params).fetchone()
        return row

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Execute a statement; how many rows it changed."""
        return self._connection.execute(self._dialect.sql(sql), params).rowcount

    def plain_rows(
        self, sql: str, params: Sequence[object], *, sealed: int, decimal: int
    ) -> list[Any]:
        """Rows as plain tuples (Dialect.plain_rows)."""
        return self._dialect.plain_rows(
            self._connection, sql, params, sealed=sealed, decimal=decimal
        )

    def insert(self, head: str, rows: Sequence[Sequence[object]]) -> None:
        """`head` (`INSERT INTO t (a, b) VALUES`) with every one of `rows`, many rows to a
        statement: 256, then the rest in powers of two, so that a handful of statement texts
        serve every batch from the statement cache.

        Not executemany: SQLite's module releases the GIL around every step, once per row,
        and takes it back behind whichever thread holds it then. With request threads busy
        parsing, 1,000 rows took 0.9-2.9 s instead of 12 ms, under the write lock that every
        writer waits for; a statement of many rows is one step."""
        if not rows:
            return
        width = len(rows[0])
        one = "(" + ", ".join(["?"] * width) + ")"
        start = 0
        while start < len(rows):
            left = len(rows) - start
            count = _ROWS_PER_INSERT if left >= _ROWS_PER_INSERT else 1 << (left.bit_length() - 1)
            chunk = rows[start : start + count]
            params = [value for row in chunk for value in row]
            self._connection.execute(
                self._dialect.sql(f"{head} {', '.join([one] * count)}"), params
            )
            start += count


class SQLStore:
    """Every store method that is the same SQL on every backend. See store/interface.py.

    A subclass provides `dialect`, `_read` and `_write` (both raise StoreUnavailable when the
    database cannot be used, and `_write` commits at the end of its block and rolls back on
    any error), `append`, `open`, `migrate` and `close`.
    """

    dialect: Dialect
    partitions: int

    def _read(self, *, snapshot: bool = False) -> AbstractContextManager[Session]:
        """A session for reads; with `snapshot`, every read in it sees one snapshot."""
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Session]:
        """A session in one write transaction, committed when the block ends."""
        raise NotImplementedError

    def _all(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        with self._read() as session:
            return session.all(sql, params)

    def _one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        with self._read() as session:
            return session.one(sql, params)

    def ping(self) -> None:
        self._one("SELECT 1 FROM log_partitions LIMIT 1")

    def secret(self, name: str) -> bytes:
        with self._write() as session:
            session.run(
                "INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (name, secrets.token_bytes(32)),
            )
            row = session.one("SELECT value FROM secrets WHERE name = ?", (name,))
        assert row is not None  # noqa: S101 - inserted just above when missing
        return bytes(row["value"])

    # --- rows to records --------------------------------------------------------------------

    def _event(self, row: Row) -> StoredEvent:
        d = self.dialect
        return StoredEvent(
            application=row["application"],
            id=row["id"],
            tenant=row["tenant"],
            type=row["type"],
            quantity=d.read_decimal(row["quantity"]),
            time=d.read_time(row["time"]),
            subject=row["subject"],
            unit=row["unit"],
            sealed=d.read_sealed(row["attributes"]),
            region=row["region"],
            received_at=d.read_time(row["received_at"]),
        )

    def _cancellation(self, row: Row) -> Cancellation:
        return Cancellation(
            application=row["application"],
            id=row["id"],
            tenant=row["tenant"],
            sealed_reason=self.dialect.read_sealed(row["reason"]),
            received_at=self.dialect.read_time(row["received_at"]),
        )

    def _data_key(self, row: Row, *, created_at: str = "created_at") -> DataKey:
        return DataKey(
            tenant=row["tenant"],
            master_key_id=row["master_key_id"],
            wrapped=bytes(row["wrapped"]) if row["wrapped"] is not None else None,
            created_at=self.dialect.read_time(row[created_at]),
            shredded_at=self.dialect.read_time_or_none(row["shredded_at"]),
        )

    def _tenant(self, row: Row) -> Tenant:
        # By name: a row joined with tenant_keys holds more columns than a Tenant has.
        return Tenant(
            id=row["id"],
            name=row["name"],
            region=row["region"],
            lateness_hours=row["lateness_hours"],
            created_at=self.dialect.read_time(row["created_at"]),
        )

    def _application(self, row: Row) -> Application:
        return Application(
            id=row["id"], name=row["name"], created_at=self.dialect.read_time(row["created_at"])
        )

    def _key(self, row: Row) -> KeyRecord:
        d = self.dialect
        tenants = json.loads(row["tenants"]) if row["tenants"] is not None else None
        return KeyRecord(
            id=row["id"],
            secret_hash=bytes(row["secret_hash"]),
            scopes=tuple(json.loads(row["scopes"])),
            application=row["application"],
            tenants=tuple(tenants) if tenants is not None else None,
            created_at=d.read_time(row["created_at"]),
            expires_at=d.read_time_or_none(row["expires_at"]),
            revoked_at=d.read_time_or_none(row["revoked_at"]),
            last_used_at=d.read_time_or_none(row["last_used_at"]),
            rotated_from=row["rotated_from"],
            replaced_by=row["replaced_by"],
        )

    def _audit_record(self, row: Row) -> AuditRecord:
        return AuditRecord(
            seq=row["seq"],
            at=self.dialect.read_time(row["at"]),
            actor=row["actor"],
            action=row["action"],
            target=row["target"],
            details=json.loads(row["details"]),
            source=row["source"],
            request_id=row["request_id"],
        )

    # --- events -----------------------------------------------------------------------------

    def _stored(self, session: Session, events: Sequence[NewEvent]) -> dict[tuple[str, str], bytes]:
        """The content digests already stored for the identities of `events`."""
        among, params = self.dialect.in_pairs(("application", "id"), [e.key for e in events])
        rows = session.all(f"SELECT application, id, digest FROM events WHERE {among}", params)
        return {
            (row["application"], row["id"]): self.dialect.read_digest(row["digest"]) for row in rows
        }

    def _add_values(self, session: Session, events: Sequence[NewEvent | TokenFill]) -> None:
        """Insert the sealed dictionary entries `events` carry, in the caller's transaction
        (an entry stored already stays as it is: equal tokens are equal values).

        In (tenant, token) order, and by an append only once it holds its partition locks:
        two writers that bring the same new entries wait for each other's in one order,
        never in a cycle with the locks or with each other."""
        entries = {(e.tenant, token): sealed for e in events for token, sealed in e.dictionary}
        if not entries:
            return
        values, params = self.dialect.table(
            "v",
            (("tenant", "text"), ("token", "text"), ("sealed", "sealed")),
            [(tenant, token, sealed) for (tenant, token), sealed in sorted(entries.items())],
        )
        session.run(
            "INSERT INTO attribute_values (tenant, token, sealed) "
            f"SELECT v.tenant, v.token, v.sealed FROM {values} WHERE TRUE ON CONFLICT DO NOTHING",
            params,
        )

    def read(
        self, *, positions: Sequence[int], start: int, filters: ExportFilter, limit: int
    ) -> ExportPage[Entry]:
        page = self.read_rows(positions=positions, start=start, filters=filters, limit=limit)
        return ExportPage(
            [_entry_of(row) for row in page.events],
            page.positions,
            page.start,
            page.has_more,
            offsets=page.offsets,
            lag=page.lag,
            epoch=page.epoch,
            heads=page.heads,
        )

    def read_rows(
        self, *, positions: Sequence[int], start: int, filters: ExportFilter, limit: int
    ) -> ExportPage[LogRow]:
        d = self.dialect
        # Events and cancellations share each partition's offsets: one query per kind, merged
        # by offset. A cancellation matches the event filters through the event it cancels.
        # The columns are those of events/log.py LogRow, times and quantity as export text.
        received = d.time_text("e.received_at")
        where, params = plan.filter_sql(filters, d, event="e", received="e.received_at")
        events_sql = (
            f"SELECT e.partition, e.log_offset, '{EVENT_ROW}', e.application, e.id, e.tenant, "
            f"e.type, {d.decimal_text('e.quantity')}, {d.time_text('e.time')}, e.subject, e.unit, "
            f"e.attributes, e.region, {received} FROM events e "
            f"WHERE e.partition = ? AND e.log_offset > ?{where} ORDER BY e.log_offset LIMIT ?"
        )
        c_where, c_params = plan.filter_sql(filters, d, event="e", received="c.received_at")
        cancellations_sql = (
            f"SELECT c.partition, c.log_offset, '{CANCELLATION_ROW}', c.application, c.id, "
            "c.tenant, NULL, NULL, NULL, NULL, NULL, c.reason, NULL, "
            f"{d.time_text('c.received_at')} FROM cancellations c "
            "JOIN events e ON e.application = c.application AND e.id = c.id "
            f"WHERE c.partition = ? AND c.log_offset > ?{c_where} ORDER BY c.log_offset LIMIT ?"
        )
        both_sql = (
            f"SELECT * FROM ({events_sql}) AS e UNION ALL SELECT * FROM ({cancellations_sql}) AS c"
        )
        with self._read(snapshot=True) as session:

            def rows(sql: str, values: Sequence[object]) -> list[tuple[int, LogRow]]:
                found = session.plain_rows(sql, values, sealed=ROW_SEALED, decimal=ROW_QUANTITY)
                return [(row[ROW_OFFSET], row) for row in found]

            def fetch(partition: int, after: int, count: int) -> list[tuple[int, LogRow]]:
                event_values = (partition, after, *params, count)
                cancellation_values = (partition, after, *c_params, count)
                if filters.kind == "event":
                    return rows(events_sql, event_values)
                if filters.kind == "cancellation":
                    return rows(cancellations_sql, cancellation_values)
                # Both kinds in one statement: a round trip less per partition read.
                both = rows(both_sql, (*event_values, *cancellation_values))
                return plan.merged(both, limit=count)

            state = session.all(_LOG_STATE)
            heads = [int(row["last_offset"]) for row in state]
            page = plan.read_page(
                fetch,
                heads=dict(enumerate(heads)),
                positions=positions,
                start=start,
                wanted=plan.wanted_partitions(filters, self.partitions),
                limit=limit,
            )
            # Migration 0007 makes the first epoch: there is always one.
            page.epoch, page.heads = bytes(state[0]["epoch"]), heads
            tenants, tenant_params = d.in_list(
                "tenant", sorted({row[ROW_TENANT] for row in page.events})
            )
            page.shredded = {
                row["tenant"]
                for row in session.all(
                    f"SELECT tenant FROM tenant_keys WHERE wrapped IS NULL AND {tenants}",
                    tenant_params,
                )
            }
            return page

    def log_epochs(self) -> list[LogEpoch]:
        d = self.dialect
        rows = self._all(f"SELECT {_EPOCH_COLUMNS} FROM log_epochs ORDER BY seq")
        return [
            LogEpoch(
                seq=int(row["seq"]),
                id=bytes(row["epoch"]),
                started_at=d.read_time(row["started_at"]),
                reason=row["reason"],
                base=[int(offset) for offset in json.loads(row["base"])],
            )
            for row in rows
        ]

    def renew_log_epoch(
        self, *, reason: str, at: datetime, audit: AuditEntry | None = None
    ) -> LogEpoch:
        with self._write() as session:
            # Every counter row held (FOR UPDATE; SQLite's write transaction holds them all):
            # no append commits between reading the heads and starting the epoch on them.
            rows = session.all(
                "SELECT partition, last_offset FROM log_partitions "
                f"ORDER BY partition{self.dialect.for_update}"
            )
            base = [int(row["last_offset"]) for row in rows]
            last = session.one("SELECT MAX(seq) AS seq FROM log_epochs")
            assert last is not None  # noqa: S101 - an aggregate answers one row
            seq = int(last["seq"] or 0) + 1
            epoch = LogEpoch(
                seq=seq, id=secrets.token_bytes(16), started_at=at, reason=reason, base=base
            )
            session.run(
                f"INSERT INTO log_epochs ({_EPOCH_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (seq, epoch.id, self.dialect.time(at), reason, json.dumps(base)),
            )
            self._audit(session, audit)
        return epoch

    def cancel(self, cancellation: Cancellation) -> tuple[Cancellation, bool]:
        d = self.dialect
        partition = partition_of(cancellation.tenant, self.partitions)
        with self._write() as session:
            # The append's discipline: the partition's counter row is locked first and held
            # until commit (FOR UPDATE; on SQLite the write transaction holds the database),
            # so offsets follow commit order across both kinds of entry. Once it is held, no
            # other cancellation of this event (same tenant, same partition) can be running.
            counter = session.one(
                f"SELECT last_offset FROM log_partitions WHERE partition = ?{d.for_update}",
                (partition,),
            )
            assert counter is not None  # noqa: S101 - every partition has its counter row
            stored = session.one(
                f"SELECT {CANCELLATION_COLUMNS} FROM cancellations WHERE application = ? "
                "AND id = ?",
                cancellation.key,
            )
            if stored is not None:
                return self._cancellation(stored), False
            offset = int(counter["last_offset"]) + 1
            session.run(
                "INSERT INTO cancellations (partition, log_offset, application, id, tenant, "
                "reason, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    partition,
                    offset,
                    cancellation.application,
                    cancellation.id,
                    cancellation.tenant,
                    d.sealed(cancellation.sealed_reason),
                    d.time(cancellation.received_at),
                ),
            )
            session.run(
                "UPDATE log_partitions SET last_offset = ? WHERE partition = ?", (offset, partition)
            )
        return cancellation, True

    def get_cancellation(self, application: str, event_id: str) -> Cancellation | None:
        row = self._one(
            f"SELECT {CANCELLATION_COLUMNS} FROM cancellations WHERE application = ? AND id = ?",
            (application, event_id),
        )
        return self._cancellation(row) if row is not None else None

    def events_without_tokens(
        self, *, after: tuple[int, int], limit: int
    ) -> list[tuple[int, int, StoredEvent]]:
        rows = self._all(
            f"SELECT partition, log_offset, {EVENT_COLUMNS} FROM events "
            "WHERE attribute_tokens IS NULL AND (partition > ? OR (partition = ? AND "
            "log_offset > ?)) ORDER BY partition, log_offset LIMIT ?",
            (after[0], after[0], after[1], limit),
        )
        return [(row["partition"], row["log_offset"], self._event(row)) for row in rows]

    def add_attribute_tokens(self, fills: Sequence[TokenFill]) -> int:
        with self._write() as session:
            filled = sum(
                session.run(
                    "UPDATE events SET attribute_tokens = ? "
                    "WHERE application = ? AND id = ? AND attribute_tokens IS NULL",
                    (fill.attribute_tokens, fill.application, fill.id),
                )
                for fill in fills
            )
            self._add_values(session, fills)
        return filled

    def usage(self, query: UsageQuery, *, key_tokens: KeyTokens, label: Label) -> list[UsageRow]:
        d = self.dialect
        with self._read(snapshot=True) as session:
            # Both steps in one snapshot: every token the aggregate meets has its label.
            labels: dict[str, list[tuple[str, str, str, int]]] = {}
            for key in query.attribute_keys():
                tokens = key_tokens.get(key, ())
                if not tokens:
                    continue
                found = session.all(*usage_sql.tokens_sql(query, key, tokens, d))
                named = label(
                    key,
                    [
                        (
                            row["tenant"],
                            row["token"],
                            d.read_sealed(row["sealed"]) if row["sealed"] is not None else None,
                        )
                        for row in found
                    ],
                )
                of_tenant = dict(tokens)
                labels[key] = [
                    (tenant, of_tenant[tenant], token, number)
                    for (tenant, token), number in named.items()
                ]
            rows = session.all(*usage_sql.usage_sql(query, labels, d))
        return usage_sql.read_rows(rows, query, d)

    def get_event(self, application: str, event_id: str) -> StoredEvent | None:
        row = self._one(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE application = ? AND id = ?",
            (application, event_id),
        )
        return self._event(row) if row is not None else None

    def totals(self, filters: ExportFilter) -> Totals:
        d = self.dialect
        where, params = plan.filter_sql(filters, d)
        row = self._one(
            f"SELECT count(*) AS n, {d.sum('quantity')} AS total, {d.min('quantity')} AS least, "
            f"{d.max('quantity')} AS greatest FROM events WHERE TRUE{where}",
            params,
        )
        assert row is not None  # noqa: S101 - an aggregate always answers one row
        return Totals(
            count=int(row["n"]),
            sum=d.read_decimal_or_none(row["total"]),
            min=d.read_decimal_or_none(row["least"]),
            max=d.read_decimal_or_none(row["greatest"]),
        )

    def period_figures(
        self, filters: ExportFilter, periods: Sequence[tuple[datetime, datetime]]
    ) -> list[PeriodFigures]:
        d = self.dialect
        ranges, params = d.ranges(periods)
        where, filtered = plan.filter_sql(filters, d)
        gone, _ = plan.cancelled("e", self.dialect)
        rows = self._all(
            "SELECT e.tenant, e.type, r.n, "
            f"sum(CASE WHEN {gone} THEN 0 ELSE 1 END) AS live, "
            f"{d.sum(f'CASE WHEN {gone} THEN NULL ELSE e.quantity END')} AS live_sum, "
            f"sum(CASE WHEN {gone} THEN 1 ELSE 0 END) AS gone, "
            f"{d.sum(f'CASE WHEN {gone} THEN e.quantity END')} AS gone_sum, "
            "max(e.received_at) AS last_received_at "
            f"FROM events e JOIN ({ranges}) r "
            "ON e.time >= r.range_start AND e.time < r.range_end "
            f"WHERE TRUE{where} GROUP BY e.tenant, e.type, r.n ORDER BY e.tenant, e.type, r.n",
            [*params, *filtered],
        )
        zero = d.read_decimal("0")
        return [
            PeriodFigures(
                tenant=row["tenant"],
                type=row["type"],
                period=int(row["n"]),
                count=int(row["live"]),
                sum=d.read_decimal_or_none(row["live_sum"]) or zero,
                cancelled_count=int(row["gone"]),
                cancelled_sum=d.read_decimal_or_none(row["gone_sum"]) or zero,
                last_received_at=d.read_time(row["last_received_at"]),
            )
            for row in rows
        ]

    def read_in_time_order(
        self,
        tenant: str,
        *,
        time_from: datetime,
        time_to: datetime,
        after: TimeKey | None,
        limit: int,
    ) -> list[tuple[StoredEvent, bool]]:
        d = self.dialect
        # `time >= ?` first, then the row comparison: the range walks events_tenant_time.
        since, params = "time >= ?", [d.time(time_from)]
        if after is not None:
            time, application, event_id = after
            since = "time >= ? AND (time, application, id) > (?, ?, ?)"
            params = [d.time(time), d.time(time), application, event_id]
        gone, _ = plan.cancelled("e", d)
        rows = self._all(
            f"SELECT {EVENT_COLUMNS}, {gone} AS cancelled FROM events e "
            f"WHERE tenant = ? AND time < ? AND {since} ORDER BY time, application, id LIMIT ?",
            [tenant, d.time(time_to), *params, limit],
        )
        return [(self._event(row), bool(row["cancelled"])) for row in rows]

    def find_events(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[StoredEvent, bytes]]:
        among, params = self.dialect.in_pairs(("application", "id"), keys)
        rows = self._all(f"SELECT {EVENT_COLUMNS}, digest FROM events WHERE {among}", params)
        return {
            (row["application"], row["id"]): (
                self._event(row),
                self.dialect.read_digest(row["digest"]),
            )
            for row in rows
        }

    # --- meters ---------------------------------------------------------------------------

    def create_meter(self, meter: Meter, *, audit: AuditEntry | None = None) -> None:
        self._insert(
            "INSERT INTO meters (id, spec, created_at) VALUES (?, ?, ?)",
            (meter.id, meter.spec, self.dialect.time(meter.created_at)),
            what="meter",
            audit=audit,
        )

    def _meter(self, row: Row) -> Meter:
        return Meter(
            id=row["id"], spec=row["spec"], created_at=self.dialect.read_time(row["created_at"])
        )

    def get_meter(self, meter_id: str) -> Meter | None:
        row = self._one("SELECT * FROM meters WHERE id = ?", (meter_id,))
        return self._meter(row) if row is not None else None

    def list_meters(self) -> list[Meter]:
        return [self._meter(row) for row in self._all("SELECT * FROM meters ORDER BY id")]

    def delete_meter(self, meter_id: str, *, audit: AuditEntry | None = None) -> bool:
        with self._write() as session:
            deleted = session.run("DELETE FROM meters WHERE id = ?", (meter_id,))
            if deleted == 1:
                self._audit(session, audit)
        return deleted == 1

    # --- tenant data keys -------------------------------------------------------------------

    def tenants_with_keys(self, ids: Sequence[str]) -> dict[str, tuple[Tenant, DataKey | None]]:
        among, params = self.dialect.in_list("t.id", ids)
        rows = self._all(
            "SELECT t.*, k.tenant, k.master_key_id, k.wrapped, k.created_at AS key_created_at, "
            "k.shredded_at FROM tenants t LEFT JOIN tenant_keys k ON k.tenant = t.id "
            f"WHERE {among}",
            params,
        )
        return {
            row["id"]: (
                self._tenant(row),
                # LEFT JOINed with tenant_keys: no key row, no data key yet.
                None if row["tenant"] is None else self._data_key(row, created_at="key_created_at"),
            )
            for row in rows
        }

    def add_data_key(self, key: DataKey) -> DataKey:
        with self._write() as session:
            session.run(
                "INSERT INTO tenant_keys (tenant, master_key_id, wrapped, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (tenant) DO NOTHING",
                (key.tenant, key.master_key_id, key.wrapped, self.dialect.time(key.created_at)),
            )
            row = session.one("SELECT * FROM tenant_keys WHERE tenant = ?", (key.tenant,))
        assert row is not None  # noqa: S101 - inserted just above when missing
        return self._data_key(row)

    def rewrap_data_key(
        self,
        tenant: str,
        *,
        expected_master: str,
        master_key_id: str,
        wrapped: bytes,
        at: datetime,
    ) -> bool:
        with self._write() as session:
            changed = session.run(
                "UPDATE tenant_keys SET master_key_id = ?, wrapped = ?, rewrapped_at = ? "
                "WHERE tenant = ? AND master_key_id = ? AND shredded_at IS NULL",
                (master_key_id, wrapped, self.dialect.time(at), tenant, expected_master),
            )
        return changed == 1

    def shred_data_key(self, tenant: str, *, at: datetime, audit: AuditEntry | None = None) -> bool:
        with self._write() as session:
            found = session.one(
                f"SELECT 1 FROM tenants WHERE id = ?{self.dialect.for_share}", (tenant,)
            )
            if found is None:
                return False
            stamp = self.dialect.time(at)
            session.run(
                "INSERT INTO tenant_keys (tenant, created_at, shredded_at) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant) DO UPDATE SET master_key_id = NULL, wrapped = NULL, "
                "shredded_at = excluded.shredded_at WHERE tenant_keys.shredded_at IS NULL",
                (tenant, stamp, stamp),
            )
            self._audit(session, audit)
        return True

    def data_keys_to_rewrap(self, newest: str, *, limit: int) -> list[DataKey]:
        rows = self._all(
            "SELECT * FROM tenant_keys WHERE wrapped IS NOT NULL AND master_key_id <> ? "
            "ORDER BY tenant LIMIT ?",
            (newest, limit),
        )
        return [self._data_key(row) for row in rows]

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
        return [self._data_key(row) for row in rows]

    # --- registration -----------------------------------------------------------------------

    def create_tenant(self, tenant: Tenant, *, audit: AuditEntry | None = None) -> None:
        self._insert(
            "INSERT INTO tenants (id, name, region, lateness_hours, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                tenant.id,
                tenant.name,
                tenant.region,
                tenant.lateness_hours,
                self.dialect.time(tenant.created_at),
            ),
            what="tenant",
            audit=audit,
        )

    def get_tenants(self, ids: Sequence[str]) -> dict[str, Tenant]:
        among, params = self.dialect.in_list("id", ids)
        rows = self._all(f"SELECT * FROM tenants WHERE {among}", params)
        return {row["id"]: self._tenant(row) for row in rows}

    def update_tenant(self, old: Tenant, new: Tenant, *, audit: AuditEntry | None = None) -> bool:
        with self._write() as session:
            changed = session.run(
                "UPDATE tenants SET name = ?, lateness_hours = ? "
                f"WHERE id = ? AND {self.dialect.same('name')} AND lateness_hours = ?",
                (new.name, new.lateness_hours, old.id, old.name, old.lateness_hours),
            )
            if changed == 1:
                self._audit(session, audit)
        return changed == 1

    def list_tenants(self) -> list[Tenant]:
        return [self._tenant(row) for row in self._all("SELECT * FROM tenants ORDER BY id")]

    def create_application(
        self, application: Application, *, audit: AuditEntry | None = None
    ) -> None:
        self._insert(
            "INSERT INTO applications (id, name, created_at) VALUES (?, ?, ?)",
            (application.id, application.name, self.dialect.time(application.created_at)),
            what="application",
            audit=audit,
        )

    def get_application(self, application_id: str) -> Application | None:
        row = self._one("SELECT * FROM applications WHERE id = ?", (application_id,))
        return self._application(row) if row is not None else None

    def list_applications(self) -> list[Application]:
        rows = self._all("SELECT * FROM applications ORDER BY id")
        return [self._application(row) for row in rows]

    def create_key(self, key: KeyRecord, *, audit: AuditEntry | None = None) -> None:
        self._insert(*self._key_insert(key), what="key", audit=audit)

    def find_key(self, secret_hash: bytes) -> KeyRecord | None:
        row = self._one("SELECT * FROM api_keys WHERE secret_hash = ?", (secret_hash,))
        return self._key(row) if row is not None else None

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return self._key(row) if row is not None else None

    def list_keys(self) -> list[KeyRecord]:
        rows = self._all("SELECT * FROM api_keys ORDER BY created_at, id")
        return [self._key(row) for row in rows]

    def revoke_key(
        self,
        key_id: str,
        *,
        at: datetime,
        audit: AuditEntry | None = None,
        keep_an_admin: bool = False,
    ) -> bool:
        with self._write() as session:
            if keep_an_admin:
                # Every admin key's row held until commit (SQLite: by BEGIN IMMEDIATE;
                # PostgreSQL: FOR UPDATE): a concurrent revocation (or rotation) of an admin
                # key waits, then this one reads the rows as it left them.
                admins = session.all(
                    "SELECT * FROM api_keys WHERE scopes LIKE ? "
                    f"ORDER BY id{self.dialect.for_update}",
                    (ADMIN_SCOPES_LIKE,),
                )
                refuse_last_admin(key_id, [self._key(row) for row in admins], at)
            changed = session.run(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (self.dialect.time(at), key_id),
            )
            if changed == 1:
                self._audit(session, audit)
        return changed == 1

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
            with self._write() as session:
                # The UPDATE holds the old key's row, so a concurrent rotation waits and then
                # finds replaced_by set: the chain cannot fork.
                changed = session.run(
                    "UPDATE api_keys SET expires_at = ?, replaced_by = ? WHERE id = ? "
                    "AND revoked_at IS NULL AND replaced_by IS NULL "
                    "AND (expires_at IS NULL OR expires_at > ?)",
                    (self.dialect.time(old_expires_at), new.id, old_id, self.dialect.time(now)),
                )
                if changed != 1:
                    raise _NotRotatable
                session.run(*self._key_insert(new))
                self._audit(session, audit)
        except _NotRotatable:
            return False
        return True

    def touch_key(self, key_id: str, *, at: datetime, every: timedelta) -> None:
        with self._write() as session:
            session.run(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ? "
                "AND (last_used_at IS NULL OR last_used_at <= ?)",
                (self.dialect.time(at), key_id, self.dialect.time(at - every)),
            )

    def count_keys(self) -> int:
        row = self._one("SELECT count(*) AS n FROM api_keys")
        return int(row["n"]) if row is not None else 0

    def _key_insert(self, key: KeyRecord) -> tuple[str, tuple[object, ...]]:
        d = self.dialect
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
                d.time(key.created_at),
                d.time_or_none(key.expires_at),
                d.time_or_none(key.revoked_at),
                d.time_or_none(key.last_used_at),
                key.rotated_from,
                key.replaced_by,
            ),
        )

    def _insert(
        self,
        sql: str,
        params: Sequence[object],
        *,
        what: str,
        audit: AuditEntry | None = None,
    ) -> None:
        try:
            with self._write() as session:
                session.run(sql, params)
                self._audit(session, audit)
        except self.dialect.unique_violation as error:
            raise AlreadyExists(f"A {what} with this id exists already.") from error

    # --- audit log --------------------------------------------------------------------------

    def record_audit(self, entry: AuditEntry) -> None:
        with self._write() as session:
            self._audit(session, entry)

    def list_audit(self, filters: AuditFilter, *, limit: int) -> list[AuditRecord]:
        where, params = audit_where(filters, self.dialect)
        rows = self._all(
            f"SELECT * FROM audit_log WHERE {where} ORDER BY seq DESC LIMIT ?", (*params, limit)
        )
        return [self._audit_record(row) for row in rows]

    def _audit(self, session: Session, entry: AuditEntry | None) -> None:
        """Append `entry` inside the caller's write transaction (so it commits with the action);
        None records nothing."""
        if entry is None:
            return
        session.run(
            "INSERT INTO audit_log (at, actor, action, target, details, source, request_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                self.dialect.time(entry.at),
                entry.actor,
                entry.action,
                entry.target,
                json.dumps(entry.details, sort_keys=True),
                entry.source,
                entry.request_id,
            ),
        )


class _NotRotatable(Exception):
    """Rolls a rotation back when the old key cannot be rotated (see rotate_key)."""
