"""What differs between SQLite and PostgreSQL in the SQL that is otherwise written once.

The shared queries (store/sql.py) are written with `?` placeholders and ask the dialect for
the few fragments and values that differ: binding a list, comparing with NULL, locking rows,
exact aggregates, and how times, decimals and sealed bytes are kept. Only fixed fragments are
ever put into SQL; every value is bound.

Adding a dialect method is the way to keep a query single: a query that needs a new kind of
value or fragment gets a method here on both dialects, never a second copy of the query.
"""

from __future__ import annotations

import base64
import errno
import json
import re
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Any, ClassVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import tuple_row

from tally.events.model import format_decimal, format_time, parse_time

# A write refused for want of space: the disk, the user's quota, or the file-size limit.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

Fragment = tuple[str, list[object]]
"""A piece of SQL with `?` placeholders and the values they bind, in order."""


class Dialect:
    """The shared half: the methods whose SQL is the same and only the values differ."""

    name: ClassVar[str]
    # Errors that mean the database cannot be reached or used now (StoreUnavailable), and
    # errors that mean a unique constraint refused an insert (AlreadyExists), and errors that
    # mean the database role may not use a table (a deployment whose grants are missing).
    unavailable: ClassVar[tuple[type[BaseException], ...]]
    unique_violation: ClassVar[tuple[type[BaseException], ...]]
    privilege: ClassVar[tuple[type[BaseException], ...]]
    # Appended to a SELECT that must hold its rows until commit. Empty on SQLite, whose
    # write transactions (BEGIN IMMEDIATE) hold the whole database.
    for_update: ClassVar[str]
    for_share: ClassVar[str]

    def sql(self, text: str) -> str:
        """`text` with the driver's placeholder for each `?`."""
        return text

    def full(self, error: BaseException) -> bool:
        """Whether `error` (the driver's, or an OSError) says the disk under the store is full."""
        return isinstance(error, OSError) and error.errno in _NO_SPACE

    def in_list(self, column: str, values: Sequence[object]) -> Fragment:
        """`column` is one of `values` (one bound parameter, however many values)."""
        raise NotImplementedError

    def in_pairs(self, columns: tuple[str, str], pairs: Sequence[tuple[str, str]]) -> Fragment:
        """The row (columns) is one of `pairs` of text values."""
        raise NotImplementedError

    def same(self, column: str) -> str:
        """`column` equals the bound value, NULL equal to NULL."""
        raise NotImplementedError

    def ranges(self, bounds: Sequence[tuple[datetime, datetime]]) -> Fragment:
        """A subquery of one row per `(start, end)` pair of times: columns `n` (its index in
        `bounds`, from 0), `range_start` and `range_end`, comparable with a time column."""
        raise NotImplementedError

    def table(
        self, alias: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[object]]
    ) -> Fragment:
        """`rows` as a table to select from or join, `alias(name, …)`, bound as one parameter
        per column (PostgreSQL) or one in all (SQLite). Each column is (name, kind), a kind
        one of `text`, `integer`, `time` and `sealed` (bytes)."""
        raise NotImplementedError

    def json_member(self, document: str, key: str) -> str:
        """The text of member `key` (an SQL expression) of the JSON object `document`."""
        return f"({document} ->> {key})"

    # The prefix of the exact aggregates' names: sum, min and max are `{exact}sum` and so on.
    exact: ClassVar[str]

    # Whether a query bucketing events into windows also bounds them by the whole range
    # (store/usage.py): on PostgreSQL the range keeps a tenant's search to the range instead
    # of the tenant's whole history; SQLite then searches the whole range once per window.
    windows_within_range: ClassVar[bool]

    def sum(self, expression: str) -> str:
        """The exact sum of a decimal column or expression (NULL over no rows), read back with
        `read_decimal`: never through floating point."""
        return f"{self.exact}sum({expression})"

    def min(self, expression: str) -> str:
        """The least value of a decimal expression, compared as decimals (not as text)."""
        return f"{self.exact}min({expression})"

    def max(self, expression: str) -> str:
        """The greatest value of a decimal expression, compared as decimals."""
        return f"{self.exact}max({expression})"

    def time(self, value: datetime) -> object:
        return value

    def time_or_none(self, value: datetime | None) -> object:
        return self.time(value) if value is not None else None

    def read_time(self, value: Any) -> datetime:
        return value  # type: ignore[no-any-return]

    def read_time_or_none(self, value: Any) -> datetime | None:
        return self.read_time(value) if value is not None else None

    def read_decimal(self, value: Any) -> Decimal:
        return Decimal(value)

    def read_decimal_or_none(self, value: Any) -> Decimal | None:
        return self.read_decimal(value) if value is not None else None

    def sealed(self, value: bytes) -> object:
        """Sealed bytes (attributes, a cancellation's reason) as a sealed column keeps them."""
        return value

    def read_sealed(self, value: Any) -> bytes:
        """Sealed bytes as kept in a sealed column (an event's `attributes`, a
        cancellation's `reason`)."""
        return bytes(value)

    def read_digest(self, value: Any) -> bytes:
        """An event's content digest as kept in its `digest` column."""
        return bytes(value)

    # --- the export's rows: text as the export writes it, from the database --------------

    def time_text(self, column: str) -> str:
        """An SQL expression: the time `column` as `format_time` writes it."""
        raise NotImplementedError

    def decimal_text(self, column: str) -> str:
        """An SQL expression: the decimal `column` as text (`plain_rows` makes it the text
        `format_decimal` writes)."""
        raise NotImplementedError

    def plain_rows(
        self, connection: Any, sql: str, params: Sequence[object], *, sealed: int, decimal: int
    ) -> list[Any]:
        """The rows of `sql` as plain tuples, without a mapping per row (the export reads
        many): column `sealed` (an index) as `read_sealed` gives it, column `decimal` (a
        `decimal_text`, or NULL) as `format_decimal` writes it."""
        raise NotImplementedError


# What format_decimal writes: no exponent, no sign, no leading or trailing zeros.
_CANONICAL_DECIMAL = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")


class SQLiteDialect(Dialect):
    """Times as fixed-width RFC 3339 text (text order is time order), decimals as canonical
    text, lists bound as one JSON array read with json_each."""

    name = "sqlite"
    unavailable = (sqlite3.OperationalError,)
    unique_violation = (sqlite3.IntegrityError,)
    privilege = ()  # file permissions, not roles: an unreadable file is unavailable
    for_update = ""
    for_share = ""

    def full(self, error: BaseException) -> bool:
        # SQLITE_FULL: a write found no space (SQLite reports a file-size limit, EFBIG, as a
        # plain I/O error, which stays unavailable).
        if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        return super().full(error)

    def in_list(self, column: str, values: Sequence[object]) -> Fragment:
        return f"{column} IN (SELECT value FROM json_each(?))", [json.dumps(list(values))]

    def in_pairs(self, columns: tuple[str, str], pairs: Sequence[tuple[str, str]]) -> Fragment:
        first, second = columns
        return (
            f"({first}, {second}) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?))",
            [json.dumps([list(pair) for pair in pairs])],
        )

    # SQLite keeps quantities as canonical decimal text, and its own sum/min/max would go
    # through floating point (sum) or compare text ('10' < '9'): decimal_sum/min/max, registered
    # on every connection the store opens (`register`), work on Decimals and answer canonical
    # text.
    exact = "decimal_"

    # With the range as well, SQLite searched the index by the range instead of each
    # window's bounds: 2,880 minute windows over 20,000 events took 191 s instead of 0.3 s.
    windows_within_range = False

    @staticmethod
    def register(connection: sqlite3.Connection) -> None:
        """Define decimal_sum, decimal_min and decimal_max on `connection`."""
        connection.create_aggregate("decimal_sum", 1, _DecimalSum)
        connection.create_aggregate("decimal_min", 1, _DecimalMin)
        connection.create_aggregate("decimal_max", 1, _DecimalMax)

    def ranges(self, bounds: Sequence[tuple[datetime, datetime]]) -> Fragment:
        # json_each's `key` is the array index; times as the same fixed-width text as the
        # time columns, so text order is time order.
        return (
            "SELECT key AS n, value ->> 0 AS range_start, value ->> 1 AS range_end "
            "FROM json_each(?)",
            [json.dumps([[format_time(s), format_time(e)] for s, e in bounds])],
        )

    def same(self, column: str) -> str:
        # SQLite 3.38 (our minimum) has `IS` but not yet `IS NOT DISTINCT FROM` (3.39).
        return f"{column} IS ?"

    def time(self, value: datetime) -> object:
        return format_time(value)

    def table(
        self, alias: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[object]]
    ) -> Fragment:
        def cell(kind: str, value: object) -> object:
            if value is None:
                return None
            if kind == "time":
                assert isinstance(value, datetime)  # noqa: S101 - the column's declared kind
                return format_time(value)
            if kind == "sealed":
                assert isinstance(value, bytes)  # noqa: S101 - the column's declared kind
                return base64.b64encode(value).decode()  # kept as base64 text, as attributes
            return value

        kinds = [kind for _, kind in columns]
        picked = ", ".join(f"value ->> {n} AS {name}" for n, (name, _) in enumerate(columns))
        encoded = [[cell(k, v) for k, v in zip(kinds, row, strict=True)] for row in rows]
        return f"(SELECT {picked} FROM json_each(?)) AS {alias}", [json.dumps(encoded)]

    def read_time(self, value: Any) -> datetime:
        return parse_time(value)

    def sealed(self, value: bytes) -> object:
        return base64.b64encode(value).decode()

    def read_sealed(self, value: Any) -> bytes:
        # Plaintext JSON from before encryption at rest starts with '{'; base64 never does.
        text = str(value)
        return text.encode() if text.startswith("{") else base64.b64decode(text)

    def read_digest(self, value: Any) -> bytes:
        return bytes.fromhex(value)

    # Times are kept as format_time's text, quantities as format_decimal's.
    def time_text(self, column: str) -> str:
        return column

    def decimal_text(self, column: str) -> str:
        return column

    def plain_rows(
        self, connection: Any, sql: str, params: Sequence[object], *, sealed: int, decimal: int
    ) -> list[Any]:
        cursor = connection.cursor()
        cursor.row_factory = None
        found: list[Any] = cursor.execute(sql, params).fetchall()
        rows: list[Any] = []
        for row in found:
            values = list(row)
            values[sealed] = self.read_sealed(values[sealed])
            text = values[decimal]
            # Written by format_decimal; anything else (a store written by hand) is made so.
            if text is not None and not _CANONICAL_DECIMAL.fullmatch(text):
                values[decimal] = format_decimal(Decimal(text))
            rows.append(tuple(values))
        return rows


class PostgresDialect(Dialect):
    """Native types (timestamptz, numeric, bytea); lists bound as arrays."""

    name = "postgresql"
    unavailable = (psycopg.OperationalError, pg_errors.AdminShutdown)
    unique_violation = (pg_errors.UniqueViolation,)
    privilege = (pg_errors.InsufficientPrivilege,)
    for_update = " FOR UPDATE"
    for_share = " FOR SHARE"

    def full(self, error: BaseException) -> bool:
        # SQLSTATE 53100 disk_full: the server could not extend a table, an index or a
        # temporary file (a full WAL volume is no error but a PANIC: the server restarts).
        return isinstance(error, pg_errors.DiskFull) or super().full(error)

    def sql(self, text: str) -> str:
        # No query of Tally's uses a literal '?' or '%' (jsonb's '?' operators included).
        # Arrays are bound in binary (`%b`, written by the fragments below): psycopg dumps a
        # text array about 2.7 times faster so, with no quoting of each element, and every
        # append binds one per column of its batch.
        return text.replace("?", "%s")

    def in_list(self, column: str, values: Sequence[object]) -> Fragment:
        return f"{column} = ANY(%b)", [list(values)]

    def in_pairs(self, columns: tuple[str, str], pairs: Sequence[tuple[str, str]]) -> Fragment:
        first, second = columns
        return (
            f"({first}, {second}) IN (SELECT * FROM unnest(%b::text[], %b::text[]))",
            [[pair[0] for pair in pairs], [pair[1] for pair in pairs]],
        )

    def same(self, column: str) -> str:
        return f"{column} IS NOT DISTINCT FROM ?"

    def ranges(self, bounds: Sequence[tuple[datetime, datetime]]) -> Fragment:
        return (
            "SELECT (n - 1) AS n, range_start, range_end FROM "
            "unnest(%b::timestamptz[], %b::timestamptz[]) WITH ORDINALITY "
            "AS r(range_start, range_end, n)",
            [[s for s, _ in bounds], [e for _, e in bounds]],
        )

    _ARRAYS: ClassVar[dict[str, str]] = {
        "text": "text[]",
        "integer": "bigint[]",
        "time": "timestamptz[]",
        "sealed": "bytea[]",
    }

    def table(
        self, alias: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[object]]
    ) -> Fragment:
        arrays = ", ".join(f"%b::{self._ARRAYS[kind]}" for _, kind in columns)
        names = ", ".join(name for name, _ in columns)
        values = [[row[n] for row in rows] for n in range(len(columns))]
        return f"unnest({arrays}) AS {alias}({names})", list(values)

    # NUMERIC arithmetic is exact: sum over numeric(38, 18) is an unconstrained numeric.
    exact = ""

    def time_text(self, column: str) -> str:
        # YYYY pads a year below 1000 to four digits, as format_time does.
        return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""

    def decimal_text(self, column: str) -> str:
        # numeric's text never has an exponent; trim_scale drops the trailing zeros of the
        # column's scale (0.100000000000000000 -> 0.1, 150.000… -> 150, 0.000… -> 0).
        return f"trim_scale({column})::text"

    def plain_rows(
        self, connection: Any, sql: str, params: Sequence[object], *, sealed: int, decimal: int
    ) -> list[Any]:
        # Binary results: bytea arrives as bytes, without the hex text of the text format.
        with connection.cursor(row_factory=tuple_row) as cursor:
            rows: list[Any] = cursor.execute(self.sql(sql), params, binary=True).fetchall()
        return rows

    # Without the range, PostgreSQL read a tenant's month through events_tenant_log: every
    # event the tenant ever had, filtered afterwards (1,000 read for the month's 333).
    windows_within_range = True


# Enough digits for any sum of NUMERIC(38, 18) values a store can hold (a sum of 10^60 of
# them); Inexact is trapped, so a sum that would round fails loudly instead.
_EXACT = Context(prec=120, traps=[Inexact, InvalidOperation])


class _DecimalSum:
    """SQLite aggregate: the exact sum of decimal texts, as canonical text (NULL for none)."""

    def __init__(self) -> None:
        self._total: Decimal | None = None

    def step(self, value: Any) -> None:
        if value is not None:
            number = Decimal(value)
            self._total = number if self._total is None else _EXACT.add(self._total, number)

    def finalize(self) -> Any:  # str | None (typeshed's aggregate protocol says int)
        return format_decimal(self._total) if self._total is not None else None


class _DecimalMin:
    """SQLite aggregate: the least decimal text, compared as decimals (NULL for none)."""

    def __init__(self) -> None:
        self._best: Decimal | None = None

    def _better(self, number: Decimal, best: Decimal) -> bool:
        return number < best

    def step(self, value: Any) -> None:
        if value is not None:
            number = Decimal(value)
            if self._best is None or self._better(number, self._best):
                self._best = number

    def finalize(self) -> Any:  # str | None (typeshed's aggregate protocol says int)
        return format_decimal(self._best) if self._best is not None else None


class _DecimalMax(_DecimalMin):
    """SQLite aggregate: the greatest decimal text, compared as decimals (NULL for none)."""

    def _better(self, number: Decimal, best: Decimal) -> bool:
        return number > best
