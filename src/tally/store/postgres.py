"""The production store on PostgreSQL (psycopg 3 with a connection pool).

Commits are durable (`synchronous_commit=on` is forced per connection). Appends lock the
touched partitions' counter rows in partition order, so offsets follow commit order and
concurrent writers never deadlock on them, as late in the transaction as they can; events go
in with one binary COPY.
"""

from __future__ import annotations

import random
import re
import select
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tally.errors import StoreFull, StoreUnavailable
from tally.events.model import NewEvent, Outcome
from tally.store import migrate, plan
from tally.store.dialect import PostgresDialect
from tally.store.sql import Session, SQLStore

# A connection that cannot serve Tally's writes: the database is gone, shutting down, or this
# server became a standby (a failover demoted it; its sessions turned read-only).
_UNAVAILABLE = (*PostgresDialect.unavailable, pg_errors.ReadOnlySqlTransaction)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

_EVENT_COLUMNS = (
    "partition, log_offset, application, id, tenant, type, quantity, time, subject, unit, "
    "attributes, region, received_at, digest, attribute_tokens"
)
_EVENT_TYPES = [
    "int2",
    "int8",
    "text",
    "text",
    "text",
    "text",
    "numeric",
    "timestamptz",
    "text",
    "text",
    "bytea",
    "text",
    "timestamptz",
    "bytea",
    "jsonb",
]
# A commit of fewer events goes in with `_append_few`, in fewer round trips; from this many,
# the binary COPY's cheaper encoding of the rows is worth its own two.
COPY_AT_LEAST = 100
_INSERT_EVENTS = (
    f"INSERT INTO events ({_EVENT_COLUMNS}) "
    "SELECT * FROM unnest(%b::smallint[], %b::bigint[], %b::text[], %b::text[], %b::text[], "
    "%b::text[], %b::numeric[], %b::timestamptz[], %b::text[], %b::text[], %b::bytea[], "
    "%b::text[], %b::timestamptz[], %b::bytea[], %b::jsonb[]) "
    "ON CONFLICT (application, id) DO NOTHING RETURNING application, id"
)
# The counter rows of the partitions an append writes to, locked in partition order.
_LOCK = (
    "SELECT partition, last_offset FROM log_partitions "
    "WHERE partition = ANY(%b) ORDER BY partition FOR UPDATE"
)
_COUNTERS = (
    "UPDATE log_partitions SET last_offset = moved.last_offset "
    "FROM unnest(%b::smallint[], %b::bigint[]) AS moved(partition, last_offset) "
    "WHERE log_partitions.partition = moved.partition"
)
_COPY_EVENTS = f"COPY events ({_EVENT_COLUMNS}) FROM STDIN (FORMAT BINARY)"


def _as_is(text: str) -> str:
    """The "dumps" of a value that is JSON text already (attribute_tokens)."""
    return text


def _tails(events: Sequence[NewEvent], received_at: datetime) -> list[tuple[object, ...]]:
    """Each event's row of `events` but for its place in the log (partition, offset)."""
    return [
        (
            e.application,
            e.id,
            e.tenant,
            e.type,
            e.quantity,
            e.time,
            e.subject,
            e.unit,
            e.attributes,
            e.region,
            received_at,
            e.digest,
            Jsonb(e.attribute_tokens, dumps=_as_is),
        )
        for e in events
    ]


def _columns(rows: Sequence[tuple[object, ...]]) -> list[list[object]]:
    """`rows` as one list per column: the arrays `_INSERT_EVENTS` takes."""
    return [list(column) for column in zip(*rows, strict=True)]


Row = dict[str, Any]
Connection = psycopg.Connection[Row]


def libpq_url(url: str) -> str:
    """`url` with the scheme libpq knows (postgresql://), all else as given: one host or a
    multi-host list (`h1:5432,h2:5432`), the query (`target_session_attrs`, `sslmode`…)
    intact. Not urlsplit: a multi-host netloc is no host and port it can parse."""
    return _SCHEME.sub("postgresql://", url, count=1)


CONNECTION_MAX_SECONDS = 1800.0  # a pooled connection's life, at most (ConnectionPool)


def _gone(connection: Connection) -> bool:
    """Whether an idle connection can no longer serve: closed, or its socket has something
    to read. An idle connection is sent nothing by a server that is alive (Tally listens to
    no notifications), so anything there is the end: the server went away (a crash or a
    restart closes its sockets) or is telling why it ends the session. Asked of the socket,
    with no round trip: the empty query that checked it before was one round trip more for
    every page read and every commit (of a single event's four), each a wait for the
    database's process to be scheduled and then for the GIL."""
    if connection.closed:
        return True
    poll = select.poll()  # not select.select: it refuses descriptors from 1,024 on
    try:
        poll.register(connection.fileno(), select.POLLIN)
    except (OSError, psycopg.Error):
        return True
    return bool(poll.poll(0))


class ConnectionPool:
    """At most `size` connections, made on demand in the thread that asks, kept for reuse.

    Not psycopg_pool's: it reconnects from a background worker with an exponential backoff
    (1 s, 2 s, 4 s…), so after an outage it could keep refusing for seconds after the
    database was back. Here a request that finds no idle connection connects itself, at
    once: the first request after the database returns (or after a failover, to the new
    primary) is served. An idle connection is checked before it is handed out (`_gone`),
    and one that broke or failed with the database is closed instead of kept.

    A connection lives at most about `max_lifetime` seconds (each its own span, within 10% of
    it, so they do not all reconnect at once): one that is older is closed when it comes back
    or, aged while idle, when it would be handed out. A backend's caches and memory then never
    grow for the life of the process, and a connection that a proxy or a DNS name routed to a
    server that is no longer the intended one is replaced within that span.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        size: int,
        timeout: float,
        kwargs: Mapping[str, Any],
        max_lifetime: float = CONNECTION_MAX_SECONDS,
    ) -> None:
        self.conninfo = conninfo
        self.timeout = timeout
        self.max_lifetime = max_lifetime
        self._kwargs = dict(kwargs)
        self._slots = threading.BoundedSemaphore(size)
        self._idle: deque[Connection] = deque()
        # id(connection) -> when it is to be retired (time.monotonic), for the open ones.
        self._retire_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> Connection:
        connection = psycopg.Connection[Row].connect(
            self.conninfo, row_factory=dict_row, **self._kwargs
        )
        # Spread, not secret: the retirements of connections made together do not coincide.
        span = self.max_lifetime * random.uniform(0.9, 1.0)  # noqa: S311
        with self._lock:
            self._retire_at[id(connection)] = time.monotonic() + span
        return connection

    def _take(self) -> Connection:
        while True:
            with self._lock:
                if self._closed:
                    raise StoreUnavailable("The PostgreSQL store is closed.")
                idle = self._idle.popleft() if self._idle else None
            if idle is None:
                return self._connect()
            if _gone(idle) or not self._young(idle):
                self._close(idle)
                continue
            return idle

    def _young(self, connection: Connection) -> bool:
        """Whether `connection` is within its lifetime."""
        with self._lock:
            return time.monotonic() < self._retire_at.get(id(connection), 0.0)

    def _give_back(self, connection: Connection, *, failed: bool) -> None:
        usable = (
            not failed
            and not connection.closed
            and connection.info.transaction_status == TransactionStatus.IDLE
        )
        if usable and self._young(connection):
            with self._lock:
                if not self._closed:
                    self._idle.append(connection)
                    return
        self._close(connection)

    def _close(self, connection: Connection) -> None:
        with self._lock:
            self._retire_at.pop(id(connection), None)
        with suppress(psycopg.Error):
            connection.close()

    def open(self) -> None:
        """Connect (or check an idle connection) at once: libpq's own error when it cannot."""
        with self.connection():
            pass

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A connection for this block. Raises StoreUnavailable when all `size` are in use
        for `timeout` seconds; psycopg's errors when connecting fails."""
        if not self._slots.acquire(timeout=self.timeout):
            raise StoreUnavailable("The PostgreSQL store has no free connection.")
        try:
            connection = self._take()
            try:
                yield connection
            except _UNAVAILABLE:
                self._give_back(connection, failed=True)
                raise
            except BaseException:
                self._give_back(connection, failed=False)
                raise
            self._give_back(connection, failed=False)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
        for connection in idle:
            self._close(connection)


class PostgresStore(SQLStore):
    """`EventStore` on PostgreSQL: the shared SQL of store/sql.py, this file's append.

    `url` may name several hosts (`postgresql://u@h1:5432,h2:5432/db?target_session_attrs=
    read-write`): libpq connects to the first that takes writes, so after a failover the
    next connection made reaches the new primary without a restart.
    """

    dialect = PostgresDialect()

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> None:
        self.url = libpq_url(url)
        self.partitions = 0
        self._pool = ConnectionPool(
            self.url,
            size=pool_size,
            timeout=connect_timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, int(connect_timeout)),
                # Durability is not left to the server's default: a 2xx needs the WAL flushed
                # (and, with synchronous replication, on the standby too).
                "options": "-c synchronous_commit=on",
                "application_name": "tally",
            },
        )

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        try:
            with self._pool.connection() as connection:
                yield connection
        except _UNAVAILABLE as error:
            if self.dialect.full(error):
                raise StoreFull(
                    "The disk under the PostgreSQL store is full: nothing of the request was "
                    "stored; retry once space is freed."
                ) from error
            raise StoreUnavailable("The PostgreSQL store cannot be reached.") from error

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Session]:
        """A pooled connection in autocommit; with `snapshot`, one REPEATABLE READ, READ ONLY
        transaction."""
        with self._connection() as connection:
            if not snapshot:
                yield Session(connection, self.dialect)
                return
            # One BEGIN that says it all (psycopg writes the characteristics into it), not a
            # BEGIN and then a SET TRANSACTION: a round trip less for every page read. Set
            # back before the connection returns to the pool; a connection left in another
            # state than idle is not kept (`_give_back`).
            connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            connection.read_only = True
            try:
                with connection.transaction():
                    yield Session(connection, self.dialect)
            finally:
                with suppress(psycopg.Error):
                    connection.isolation_level = None
                    connection.read_only = None

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._connection() as connection, connection.transaction():
            yield Session(connection, self.dialect)

    def open(self) -> PostgresStore:
        """Connect and read the partition count. Raises StoreUnavailable, from libpq's own
        error ("connection refused", "database … does not exist", "password authentication
        failed": what an operator needs) when the server cannot be reached or refuses."""
        try:
            self._pool.open()
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
            applied = migrate.apply(self.url, "postgresql")
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
        if len(events) < COPY_AT_LEAST:
            return self._append_few(events, received_at=received_at)
        try:
            return self._append(events, received_at=received_at, copy=True)
        except pg_errors.UniqueViolation:
            # Another writer stored one of these identities between our check and our COPY,
            # which then rolled the whole transaction back: append again, judging each event
            # by what is stored now, with an INSERT that skips what is taken.
            return self._append(events, received_at=received_at, copy=False)

    def _append_few(self, events: Sequence[NewEvent], *, received_at: datetime) -> list[Outcome]:
        """A small commit (single events, shared by concurrent requests) in four round
        trips, BEGIN and COMMIT included (five when it brings new dictionary entries), where
        `_append` takes nine: on a busy machine each one waits for the database's process
        and then for ours to be scheduled again, and that wait, not the work, was most of a
        small commit under load.

        The look (the counter rows locked, the stored digests read) is one statement, so its
        snapshot predates the locks: an identity that a writer of the same partition commits
        while we wait for them is not among the digests, and the INSERT skips it, to be
        judged after, as a race in another partition is."""
        with self._connection() as connection, connection.transaction():
            session = Session(connection, self.dialect)
            among, params = self.dialect.in_pairs(("application", "id"), [e.key for e in events])
            looked = session.all(
                f"WITH locked AS ({_LOCK}) "
                "SELECT partition, last_offset, NULL AS application, NULL AS id, "
                "NULL::bytea AS digest FROM locked UNION ALL "
                f"SELECT NULL, NULL, application, id, digest FROM events WHERE {among}",
                [plan.partitions_of(events, self.partitions), *params],
            )
            self._add_values(session, events)
            last = {r["partition"]: r["last_offset"] for r in looked if r["id"] is None}
            stored = {
                (r["application"], r["id"]): self.dialect.read_digest(r["digest"])
                for r in looked
                if r["id"] is not None
            }
            outcomes = plan.classify(events, stored)
            fresh = [events[i] for i in plan.accepted(events, outcomes, self.partitions)]
            if not fresh:
                return outcomes
            places, moved = plan.number(fresh, last, self.partitions)
            rows = plan.placed(places, _tails(fresh, received_at))
            inserted = {
                (row["application"], row["id"])
                for row in session.all(
                    f"WITH moved AS ({_COUNTERS}) {_INSERT_EVENTS}",
                    [list(moved), list(moved.values()), *_columns(rows)],
                )
            }
            return self._rejudged(session, events, outcomes, inserted)

    def _append(
        self, events: Sequence[NewEvent], *, received_at: datetime, copy: bool
    ) -> list[Outcome]:
        # The touched partitions' counter rows are locked in partition order until commit:
        # offsets follow commit order, and concurrent writers never deadlock on them. Every
        # writer waits for those locks (a batch over many tenants touches every partition),
        # so they are taken as late as they can be, once the stored digests are read and the
        # rows built; the dictionary entries follow them (`_add_values` says why). A writer
        # that commits one of these identities meanwhile fails our COPY (UniqueViolation:
        # `append` goes again) or is skipped by our INSERT (judged below).
        with self._connection() as connection, connection.transaction():
            session = Session(connection, self.dialect)
            outcomes = plan.classify(events, self._stored(session, events))
            fresh = [events[i] for i in plan.accepted(events, outcomes, self.partitions)]
            if not fresh:
                self._add_values(session, events)
                return outcomes
            tails = _tails(fresh, received_at)
            last = {
                row["partition"]: row["last_offset"]
                for row in session.all(_LOCK, (plan.partitions_of(fresh, self.partitions),))
            }
            self._add_values(session, events)
            places, moved = plan.number(fresh, last, self.partitions)
            rows = plan.placed(places, tails)
            if copy:
                # Binary COPY: each row is encoded by psycopg's C dumpers, with no array of
                # each column to build and parse. A taken identity fails it (UniqueViolation).
                with connection.cursor().copy(_COPY_EVENTS) as sink:
                    sink.set_types(_EVENT_TYPES)
                    for row in rows:
                        sink.write_row(row)
                inserted = {e.key for e in fresh}
            else:
                inserted = {
                    (row["application"], row["id"])
                    for row in session.all(_INSERT_EVENTS, _columns(rows))
                }
            session.run(_COUNTERS, (list(moved), list(moved.values())))
            return self._rejudged(session, events, outcomes, inserted)

    def _rejudged(
        self,
        session: Session,
        events: Sequence[NewEvent],
        outcomes: list[Outcome],
        inserted: set[tuple[str, str]],
    ) -> list[Outcome]:
        """`outcomes`, but for the accepted events another writer stored first (between our
        check and our insert, which skipped them): judged against what it stored. Their
        offsets stay unused, a gap that readers pass over."""
        accepted = sum(1 for o in outcomes if o is Outcome.ACCEPTED)
        if len(inserted) == accepted:
            return outcomes
        lost = [e for e in events if e.key not in inserted]
        stored = self._stored(session, lost)
        return [
            plan.classify([e], stored)[0] if e.key not in inserted else o
            for e, o in zip(events, outcomes, strict=True)
        ]
