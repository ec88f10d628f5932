"""The production store on PostgreSQL (psycopg 3 with a connection pool).

Commits are durable (`synchronous_commit=on` is forced per connection). Appends lock the
touched partitions' counter rows in partition order first, so offsets follow commit order and
concurrent writers never deadlock on them; events go in with one set-based INSERT.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from tally.errors import StoreUnavailable
from tally.events.model import NewEvent, Outcome
from tally.store import migrate, plan
from tally.store.dialect import PostgresDialect
from tally.store.sql import Session, SQLStore

_UNAVAILABLE = PostgresDialect.unavailable

Row = dict[str, Any]


def yoyo_url(url: str) -> str:
    """yoyo names the psycopg 3 driver in the URL scheme."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def libpq_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


class PostgresStore(SQLStore):
    """`EventStore` on PostgreSQL: the shared SQL of store/sql.py, this file's append."""

    dialect = PostgresDialect()

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
    def _read(self, *, snapshot: bool = False) -> Iterator[Session]:
        """A pooled connection in autocommit; with `snapshot`, one REPEATABLE READ, READ ONLY
        transaction."""
        with self._connection() as connection:
            if not snapshot:
                yield Session(connection, self.dialect)
                return
            with connection.transaction():
                connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield Session(connection, self.dialect)

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._connection() as connection, connection.transaction():
            yield Session(connection, self.dialect)

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

    # --- events ---------------------------------------------------------------------------

    def append(self, events: Sequence[NewEvent], *, received_at: datetime) -> list[Outcome]:
        if not events:
            return []
        touched = plan.partitions_of(events, self.partitions)
        # The touched partitions' counter rows, locked in partition order until commit:
        # offsets follow commit order, and concurrent writers never deadlock on them.
        with self._write() as session:
            last = {
                row["partition"]: row["last_offset"]
                for row in session.all(
                    "SELECT partition, last_offset FROM log_partitions "
                    "WHERE partition = ANY(?) ORDER BY partition FOR UPDATE",
                    (touched,),
                )
            }
            outcomes = plan.classify(events, self._stored(session, events))
            fresh = [e for e, o in zip(events, outcomes, strict=True) if o is Outcome.ACCEPTED]
            self._add_values(session, events)
            if not fresh:
                return outcomes
            places, moved = plan.number(fresh, last, self.partitions)
            inserted = {
                (row["application"], row["id"])
                for row in session.all(
                    "INSERT INTO events (partition, log_offset, application, id, tenant, type, "
                    "quantity, time, subject, unit, attributes, region, received_at, digest, "
                    "attribute_tokens) "
                    "SELECT * FROM unnest(?::smallint[], ?::bigint[], ?::text[], ?::text[], "
                    "?::text[], ?::text[], ?::numeric[], ?::timestamptz[], ?::text[], "
                    "?::text[], ?::bytea[], ?::text[], ?::timestamptz[], ?::bytea[], "
                    "?::text[]::jsonb[]) "
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
                        [e.attribute_tokens for e in fresh],
                    ),
                )
            }
            session.run(
                "UPDATE log_partitions SET last_offset = moved.last_offset "
                "FROM unnest(?::smallint[], ?::bigint[]) AS moved(partition, last_offset) "
                "WHERE log_partitions.partition = moved.partition",
                (list(moved), list(moved.values())),
            )
            if len(inserted) < len(fresh):
                # Another writer, in another partition, stored one of these identities between
                # our check and our insert: judge those events against what it stored.
                lost = [e for e in events if e.key not in inserted]
                stored = self._stored(session, lost)
                outcomes = [
                    plan.classify([e], stored)[0] if e.key not in inserted else o
                    for e, o in zip(events, outcomes, strict=True)
                ]
        return outcomes
