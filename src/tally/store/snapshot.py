"""Whole-store reads and loads for logical backups (backup/): one transaction on one connection.

`reading(store)` is one consistent snapshot of every table while writers go on: on SQLite one
read transaction on a connection of its own (WAL mode, so writers are not held up), on
PostgreSQL one REPEATABLE READ, READ ONLY transaction whose rows stream through server-side
(named) cursors. `loading(target)` is one write transaction that a restore fills and commits
only when the whole file went in and checked out; anything that raises rolls it back.

Rows cross stores in a neutral encoding of JSON values, by the column's `Kind` (how the column
keeps its value differs between the stores): text as is, integers as numbers, times as
RFC 3339 UTC text with microseconds (`format_time`), decimals as exact canonical text, bytes
as base64. Only fixed fragments and names read from the database's own catalog are put into
SQL; every value is bound.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tally.errors import StoreUnavailable
from tally.events.model import format_decimal, format_time, parse_time
from tally.store import plan
from tally.store.dialect import Dialect, PostgresDialect, SQLiteDialect
from tally.store.interface import EventStore
from tally.store.postgres import PostgresStore, libpq_url
from tally.store.sqlite import SQLiteStore, create_owner_only

Neutral = str | int | bool | None
"""A value as a backup file carries it (JSON)."""

Row = list[Neutral]

# Rows fetched from a server-side cursor per round trip, and rows inserted per statement.
FETCH = 2000


class Kind(StrEnum):
    """How a column's value is carried (see the module docstring)."""

    TEXT = "text"
    INTEGER = "integer"
    TIME = "time"
    DECIMAL = "decimal"
    BYTES = "bytes"  # raw bytes: key hashes, secrets, wrapped data keys
    SEALED = "sealed"  # sealed bytes (crypto/sealing.py), or a pre-0002 plaintext JSON object
    DIGEST = "digest"  # an event's content digest
    JSON = "json"  # JSON text (jsonb on PostgreSQL)


Column = tuple[str, Kind]


@dataclass(frozen=True, slots=True)
class MonthFigures:
    """What the database counts of one (tenant, type, calendar month in UTC), as
    `PeriodFigures` does for reconciliation: the events not cancelled and the cancelled ones
    apart. `month` is `YYYY-MM`."""

    tenant: str
    type: str
    month: str
    count: int
    sum: Decimal
    cancelled_count: int
    cancelled_sum: Decimal
    last_received_at: str


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _unb64(value: Any) -> bytes:
    return base64.b64decode(str(value), validate=True)


def _time(value: Any) -> str:
    return format_time(parse_time(str(value)))


def _decimal(value: Any) -> str:
    return format_decimal(Decimal(str(value)))


def _same(value: Any) -> Any:
    return value


def _json(value: Any) -> str:
    # One text for one document on both stores (jsonb prints its own spacing and key order).
    return json.dumps(json.loads(str(value)), sort_keys=True, separators=(",", ":"))


class Snapshot:
    """One connection inside one transaction: the catalog, counts, figures and rows of the
    store, and (in a `loading` transaction) inserts. Subclassed per store."""

    kind: str
    dialect: Dialect
    _month: str  # the SQL of an event's calendar month (UTC) as YYYY-MM, alias `e`

    def _all(self, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _stream(self, query: str, params: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        raise NotImplementedError

    def tables(self) -> dict[str, list[str]]:
        """Every table of the schema but the migration tool's (yoyo's) and the database's
        own, each with its column names in order."""
        raise NotImplementedError

    def foreign_keys(self) -> set[tuple[str, str]]:
        """(table, the table it references) for every foreign key between tables."""
        raise NotImplementedError

    def migrations(self) -> list[str]:
        """The ids of the migrations applied, in order (empty without a schema)."""
        if "_yoyo_migration" not in self._catalog():
            return []
        return sorted(str(row[0]) for row in self._all("SELECT migration_id FROM _yoyo_migration"))

    def _catalog(self) -> set[str]:
        """Every table name, yoyo's included."""
        raise NotImplementedError

    def count(self, table: str) -> int:
        (found,) = self._all(f"SELECT count(*) FROM {self._name(table)}")
        return int(found[0])

    def largest(self, table: str, column: str) -> int:
        """The largest value of the integer `column` of `table` (0 when it has no rows)."""
        (found,) = self._all(
            f"SELECT coalesce(max({self._name(column)}), 0) FROM {self._name(table)}"
        )
        return int(found[0])

    def _name(self, table: str) -> str:
        """`table` quoted as an SQL identifier. Only names read from the catalog reach here."""
        return '"' + table.replace('"', '""') + '"'

    def _select(self, column: Column) -> str:
        return self._name(column[0])

    def rows(
        self, table: str, columns: Sequence[Column], *, order_by: Sequence[str], cancelled: bool
    ) -> Iterator[Row]:
        """Every row of `table`, its `columns` in the neutral encoding, in `order_by` order;
        with `cancelled` (events), one more value after them: whether the event is cancelled
        in this snapshot."""
        picked = [f"t.{self._select(column)}" for column in columns]
        params: list[object] = []
        if cancelled:
            gone, params = plan.cancelled("t", self.dialect)
            picked.append(gone)
        order = ", ".join(f"t.{self._name(name)}" for name in order_by)
        query = f"SELECT {', '.join(picked)} FROM {self._name(table)} t ORDER BY {order}"
        readers = [self._reader(kind) for _, kind in columns]
        if cancelled:
            readers.append(bool)
        for found in self._stream(query, params):
            yield [None if v is None else read(v) for read, v in zip(readers, found, strict=True)]

    def _reader(self, kind: Kind) -> Callable[[Any], Neutral]:
        raise NotImplementedError

    def month_figures(self) -> list[MonthFigures]:
        """The figures of every (tenant, type, month) that holds an event, in one grouped
        query of this snapshot, in no set order."""
        d = self.dialect
        gone, params = plan.cancelled("e", d)
        found = self._all(
            f"SELECT e.tenant, e.type, {self._month} AS month, "
            f"sum(CASE WHEN {gone} THEN 0 ELSE 1 END), "
            f"{d.sum(f'CASE WHEN {gone} THEN NULL ELSE e.quantity END')}, "
            f"sum(CASE WHEN {gone} THEN 1 ELSE 0 END), "
            f"{d.sum(f'CASE WHEN {gone} THEN e.quantity END')}, "
            f"max(e.received_at) FROM events e GROUP BY e.tenant, e.type, {self._month}",
            [*params, *params, *params, *params],
        )
        zero = Decimal(0)
        return [
            MonthFigures(
                tenant=str(tenant),
                type=str(type_),
                month=str(month),
                count=int(live),
                sum=d.read_decimal_or_none(live_sum) or zero,
                cancelled_count=int(cancelled),
                cancelled_sum=d.read_decimal_or_none(cancelled_sum) or zero,
                last_received_at=format_time(d.read_time(last)),
            )
            for tenant, type_, month, live, live_sum, cancelled, cancelled_sum, last in found
        ]

    # --- loading ------------------------------------------------------------------------------

    def clear(self, table: str) -> None:
        """Delete every row of `table` (one the migrations seed, which a restore replaces),
        its append-only triggers notwithstanding: they hold again once this returns."""
        raise NotImplementedError

    def insert(self, table: str, columns: Sequence[Column], rows: Sequence[Row]) -> None:
        """Insert `rows` (neutral values of `columns`) into `table`."""
        raise NotImplementedError

    def continue_sequences(self) -> list[str]:
        """Make every sequence and identity column continue after the largest value its
        column holds (rows went in with their own values); the columns moved."""
        return []


class _SQLiteSnapshot(Snapshot):
    kind = "sqlite"
    dialect = SQLiteDialect()
    # Times are fixed-width RFC 3339 UTC text: the month is their first seven characters.
    _month = "substr(e.time, 1, 7)"

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        sealed = self.dialect.read_sealed
        self._readers: dict[Kind, Callable[[Any], Neutral]] = {
            Kind.TEXT: _same,
            Kind.JSON: _json,
            Kind.INTEGER: int,
            Kind.TIME: _time,
            Kind.DECIMAL: _decimal,
            Kind.BYTES: lambda v: _b64(bytes(v)),
            Kind.SEALED: lambda v: _b64(sealed(v)),
            Kind.DIGEST: lambda v: _b64(bytes.fromhex(str(v))),
        }

        def sealed_text(value: Any) -> object:
            # A plaintext object from before encryption at rest stays the text it was.
            raw = _unb64(value)
            return raw.decode() if raw[:1] == b"{" else self.dialect.sealed(raw)

        self._writers: dict[Kind, Callable[[Any], object]] = {
            Kind.TEXT: _same,
            Kind.JSON: _same,
            Kind.INTEGER: int,
            Kind.TIME: _time,
            Kind.DECIMAL: _decimal,
            Kind.BYTES: _unb64,
            Kind.SEALED: sealed_text,
            Kind.DIGEST: lambda v: _unb64(v).hex(),
        }

    def _all(self, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._connection.execute(query, params).fetchall()

    def _stream(self, query: str, params: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        # sqlite3 steps the statement as the cursor is iterated: one row at a time.
        yield from self._connection.execute(query, params)

    def _catalog(self) -> set[str]:
        found = self._all("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {str(name) for (name,) in found}

    def tables(self) -> dict[str, list[str]]:
        return {
            name: [
                str(column)
                for (column,) in self._all(
                    "SELECT name FROM pragma_table_info(?) ORDER BY cid", (name,)
                )
            ]
            for name in sorted(self._catalog())
            if not _internal(name)
        }

    def foreign_keys(self) -> set[tuple[str, str]]:
        found = self._all(
            'SELECT m.name, f."table" FROM sqlite_master m, pragma_foreign_key_list(m.name) f '
            "WHERE m.type = 'table'"
        )
        return {(str(table), str(parent)) for table, parent in found}

    def _reader(self, kind: Kind) -> Callable[[Any], Neutral]:
        return self._readers[kind]

    def clear(self, table: str) -> None:
        # A trigger cannot be switched off in SQLite: each of the table's is dropped and made
        # again from its own text, inside this transaction.
        triggers = self._all(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? "
            "ORDER BY rowid",
            (table,),
        )
        for name, _ in triggers:
            self._connection.execute(f"DROP TRIGGER {self._name(str(name))}")
        self._connection.execute(f"DELETE FROM {self._name(table)}")
        for _, text in triggers:
            self._connection.execute(str(text))

    def insert(self, table: str, columns: Sequence[Column], rows: Sequence[Row]) -> None:
        names = ", ".join(self._name(name) for name, _ in columns)
        marks = ", ".join("?" for _ in columns)
        writers = [self._writers[kind] for _, kind in columns]
        self._connection.executemany(
            f"INSERT INTO {self._name(table)} ({names}) VALUES ({marks})",
            (
                [None if v is None else write(v) for write, v in zip(writers, row, strict=True)]
                for row in rows
            ),
        )


class _PostgresSnapshot(Snapshot):
    kind = "postgresql"
    dialect = PostgresDialect()
    _month = "to_char(e.time AT TIME ZONE 'UTC', 'YYYY-MM')"

    def __init__(self, connection: psycopg.Connection[tuple[Any, ...]]) -> None:
        self._connection = connection
        self._cursors = 0
        self._readers: dict[Kind, Callable[[Any], Neutral]] = {
            Kind.TEXT: _same,
            Kind.JSON: _json,  # selected as text (_select)
            Kind.INTEGER: int,
            Kind.TIME: format_time,
            Kind.DECIMAL: format_decimal,
            Kind.BYTES: lambda v: _b64(bytes(v)),
            Kind.SEALED: lambda v: _b64(bytes(v)),
            Kind.DIGEST: lambda v: _b64(bytes(v)),
        }
        self._writers: dict[Kind, Callable[[Any], object]] = {
            Kind.TEXT: _same,
            Kind.JSON: _same,  # COPY reads the text as jsonb
            Kind.INTEGER: int,
            Kind.TIME: lambda v: parse_time(str(v)),
            Kind.DECIMAL: lambda v: Decimal(str(v)),
            Kind.BYTES: _unb64,
            Kind.SEALED: _unb64,
            Kind.DIGEST: _unb64,
        }

    def _all(self, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._connection.execute(self.dialect.sql(query), params).fetchall()

    def _stream(self, query: str, params: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        # A named (server-side) cursor: the server keeps the result, FETCH rows at a time.
        self._cursors += 1
        with self._connection.cursor(name=f"tally_snapshot_{self._cursors}") as cursor:
            cursor.itersize = FETCH
            cursor.execute(self.dialect.sql(query), params)
            yield from cursor

    def _catalog(self) -> set[str]:
        found = self._all(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
        return {str(name) for (name,) in found}

    def tables(self) -> dict[str, list[str]]:
        columns: dict[str, list[str]] = {}
        for table, column in self._all(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
        ):
            columns.setdefault(str(table), []).append(str(column))
        return {
            name: columns.get(name, []) for name in sorted(self._catalog()) if not _internal(name)
        }

    def foreign_keys(self) -> set[tuple[str, str]]:
        found = self._all(
            "SELECT c.conrelid::regclass::text, c.confrelid::regclass::text FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE c.contype = 'f' AND n.nspname = current_schema()"
        )
        return {(str(table).strip('"'), str(parent).strip('"')) for table, parent in found}

    def _select(self, column: Column) -> str:
        name = self._name(column[0])
        return f"{name}::text" if column[1] is Kind.JSON else name

    def _reader(self, kind: Kind) -> Callable[[Any], Neutral]:
        return self._readers[kind]

    def clear(self, table: str) -> None:
        # TRUNCATE fires no row trigger (an append-only table's refuse DELETE); the owner may.
        self._connection.execute(sql.SQL("TRUNCATE {table}").format(table=sql.Identifier(table)))

    def insert(self, table: str, columns: Sequence[Column], rows: Sequence[Row]) -> None:
        writers = [self._writers[kind] for _, kind in columns]
        statement = sql.SQL("COPY {table} ({columns}) FROM STDIN").format(
            table=sql.Identifier(table),
            columns=sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns),
        )
        # COPY also takes the rows' own values for GENERATED ALWAYS identity columns.
        with self._connection.cursor().copy(statement) as copy:
            for row in rows:
                copy.write_row(
                    [None if v is None else write(v) for write, v in zip(writers, row, strict=True)]
                )

    def continue_sequences(self) -> list[str]:
        moved: list[str] = []
        for table, column, sequence in self._all(
            "SELECT table_name, column_name, pg_get_serial_sequence(quote_ident(table_name), "
            "column_name) FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND (is_identity = 'YES' OR column_default LIKE 'nextval(%%')"
        ):
            if sequence is None or _internal(str(table)):
                continue
            # The next value drawn is one past the largest restored (1 for an empty table).
            self._connection.execute(
                sql.SQL(
                    "SELECT setval(%s, coalesce(max({column}), 0) + 1, false) FROM {table}"
                ).format(column=sql.Identifier(str(column)), table=sql.Identifier(str(table))),
                (sequence,),
            )
            moved.append(f"{table}.{column}")
        return moved


def _internal(table: str) -> bool:
    """A table of the migration tool (yoyo: _yoyo_migration, yoyo_lock, …) or of SQLite."""
    return table.lstrip("_").startswith("yoyo") or table.startswith("sqlite_")


@contextmanager
def reading(store: EventStore) -> Iterator[Snapshot]:
    """One consistent snapshot of `store` for the block, on a connection of its own.

    Raises StoreUnavailable when the database cannot be reached or read."""
    if isinstance(store, SQLiteStore):
        with _sqlite(store.path, write=False) as snapshot:
            yield snapshot
    elif isinstance(store, PostgresStore):
        with _postgres(store.url, write=False) as snapshot:
            yield snapshot
    else:  # pragma: no cover - every store is one of the two
        raise TypeError(f"no snapshot for {type(store).__name__}")


@contextmanager
def loading(*, sqlite_path: Path | None = None, url: str | None = None) -> Iterator[Snapshot]:
    """One write transaction on the SQLite file `sqlite_path` or the PostgreSQL database of
    `url` (the owner's: a restore writes what the service role may not), committed when the
    block ends and rolled back if it raises. Raises StoreUnavailable."""
    if sqlite_path is not None:
        with _sqlite(sqlite_path, write=True) as snapshot:
            yield snapshot
    else:
        assert url is not None  # noqa: S101 - one of the two is given
        with _postgres(libpq_url(url), write=True) as snapshot:
            yield snapshot


@contextmanager
def inspecting(*, sqlite_path: Path | None = None, url: str | None = None) -> Iterator[Snapshot]:
    """A read-only look at a store that may have no schema yet (nothing is created: a
    missing SQLite file is an empty in-memory database). Raises StoreUnavailable."""
    if sqlite_path is not None and not sqlite_path.exists():
        with _sqlite(Path(":memory:"), write=False) as snapshot:
            yield snapshot
        return
    if sqlite_path is not None:
        with _sqlite(sqlite_path, write=False) as snapshot:
            yield snapshot
        return
    assert url is not None  # noqa: S101 - one of the two is given
    with _postgres(libpq_url(url), write=False) as snapshot:
        yield snapshot


@contextmanager
def _sqlite(path: Path, *, write: bool) -> Iterator[Snapshot]:
    try:
        if write:
            create_owner_only(path)
        connection = sqlite3.connect(path, isolation_level=None, timeout=30)
    except (sqlite3.Error, OSError) as error:
        raise StoreUnavailable("The SQLite store cannot be opened.") from error
    try:
        SQLiteDialect.register(connection)
        if str(path) != ":memory:":
            # WAL: a long read transaction holds no writer up (the store sets it too).
            connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
        # A write takes the write lock at once; a read's snapshot starts at its first read.
        connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _SQLiteSnapshot(connection)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    except sqlite3.OperationalError as error:
        raise StoreUnavailable("The SQLite store cannot be read or written.") from error
    finally:
        connection.close()


@contextmanager
def _postgres(url: str, *, write: bool) -> Iterator[Snapshot]:
    try:
        connection = psycopg.connect(
            url, autocommit=True, connect_timeout=5, application_name="tally-backup"
        )
    except psycopg.OperationalError as error:
        raise StoreUnavailable("The PostgreSQL store cannot be reached.") from error
    try:
        if write:
            # Durable like every write of the store's: a restore is acknowledged once.
            connection.execute("SET synchronous_commit = on")
        else:
            # transaction() begins with these: BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY.
            connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            connection.read_only = True
        with connection.transaction():
            yield _PostgresSnapshot(connection)
    except psycopg.OperationalError as error:
        raise StoreUnavailable("The PostgreSQL store cannot be reached.") from error
    finally:
        connection.close()
