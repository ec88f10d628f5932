"""The part of appending that is the same on every store: classify, then number.

A store calls `classify` with the digests already stored for the batch's identities, inserts
the events it marks ACCEPTED, and numbers them with `number` from its partitions' counters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

from tally.events.log import ExportFilter, ExportPage, partition_of
from tally.events.model import NewEvent, Outcome
from tally.store.dialect import Dialect, Fragment


def classify(events: Sequence[NewEvent], stored: Mapping[tuple[str, str], bytes]) -> list[Outcome]:
    """One outcome per event. The first of several equal identities in a batch is the one
    stored; later ones are duplicates or conflicts of it, exactly as if they came later."""
    seen: dict[tuple[str, str], bytes] = dict(stored)
    outcomes: list[Outcome] = []
    for event in events:
        digest = event.digest
        previous = seen.get(event.key)
        if previous is None:
            seen[event.key] = digest
            outcomes.append(Outcome.ACCEPTED)
        elif previous == digest:
            outcomes.append(Outcome.DUPLICATE)
        else:
            outcomes.append(Outcome.CONFLICT)
    return outcomes


def number(
    events: Sequence[NewEvent], last_offsets: Mapping[int, int], partitions: int
) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """(partition, offset) for each event, continuing each partition's counter; and the
    partitions' new last offsets."""
    last = dict(last_offsets)
    places: list[tuple[int, int]] = []
    for event in events:
        partition = partition_of(event.tenant, partitions)
        last[partition] += 1
        places.append((partition, last[partition]))
    return places, {p: o for p, o in last.items() if o != last_offsets[p]}


def accepted(events: Sequence[NewEvent], outcomes: Sequence[Outcome], partitions: int) -> list[int]:
    """The indices of the accepted events among `events`, in log order: by partition, and
    within one in the order they came, so `number` gives them rising offsets and their rows
    go in sorted by (partition, offset).

    Written in that order, the rows a commit gives one partition lie side by side in the
    table: a PostgreSQL heap keeps rows in the order they were inserted, and an export read
    walks one partition's offsets. Written in the order they came (tenants, and so
    partitions, mixed), each of a partition's rows lay on a heap page of its own: a read of
    1,000 rows of the 10 M-event bench store fetched 682 pages, 25 ms of the database's time
    per page. Sorted here, before a store takes its partition locks, not under them."""
    chosen = [i for i, outcome in enumerate(outcomes) if outcome is Outcome.ACCEPTED]
    chosen.sort(key=lambda i: partition_of(events[i].tenant, partitions))
    return chosen


def placed(
    places: Sequence[tuple[int, int]], tails: Sequence[tuple[object, ...]]
) -> list[tuple[object, ...]]:
    """Each event's row of `events`: its place (partition, offset, from `number`), then the
    rest of its columns (`tails`, in the same order)."""
    return [(*place, *tail) for place, tail in zip(places, tails, strict=True)]


def partitions_of(events: Sequence[NewEvent], partitions: int) -> list[int]:
    """The partitions a batch touches, sorted: locks are always taken in this order, so two
    writers never deadlock on counter rows."""
    return sorted({partition_of(event.tenant, partitions) for event in events})


def wanted_partitions(filters: ExportFilter, partitions: int) -> list[int]:
    """Only the partitions that can hold matching events: one for a tenant filter."""
    if filters.tenant is not None:
        return [partition_of(filters.tenant, partitions)]
    if filters.tenants is not None:
        return sorted({partition_of(t, partitions) for t in filters.tenants})
    return list(range(partitions))


T = TypeVar("T")
"""What a page holds: an entry (events/log.py Entry), or a row of one (LogRow)."""

Fetch = Callable[[int, int, int], list[tuple[int, T]]]


def merged(items: list[tuple[int, T]], *, limit: int) -> list[tuple[int, T]]:
    """The first `limit` of (offset, entry) pairs in offset order: one partition's events
    and cancellations, read together by one statement (a union keeps no order of its own)."""
    return sorted(items, key=lambda item: item[0])[:limit]


def read_page(
    fetch: Fetch[T],
    *,
    heads: Mapping[int, int],
    positions: Sequence[int],
    start: int,
    wanted: Sequence[int],
    limit: int,
) -> ExportPage[T]:
    """One export page, read partition by partition inside one snapshot.

    `fetch(partition, after, n)` returns up to n matching (offset, entry) pairs with offset >
    after, in offset order (events and cancellations share a partition's offsets); `heads`
    are the partitions' last offsets in the same snapshot. A partition read to its end moves
    to its head: nothing below the head can appear later, because offsets are handed out in
    commit order (events/log.py).

    Partitions are read round-robin from `start`, and a full page hands the next page the
    partition after the one it stopped in: a busy tenant's partition cannot starve the others
    of a reader that is behind. The order is only about fairness; exactly-once rests on the
    per-partition positions alone.
    """
    found: list[T] = []
    offsets: list[int] = []
    moved = list(positions)
    lag = sum(max(0, heads[p] - positions[p]) for p in wanted)
    for partition in sorted(wanted, key=lambda p: (p < start, p)):
        room = limit - len(found)
        # One row more than the page has room for tells whether another page follows.
        rows = fetch(partition, positions[partition], room + 1)
        for offset, event in rows[:room]:
            moved[partition] = offset
            found.append(event)
            offsets.append(offset)
        if len(rows) > room:
            served = room > 0
            following = (partition + 1) % len(positions) if served else partition
            return ExportPage(found, moved, following, has_more=True, offsets=offsets, lag=lag)
        moved[partition] = max(moved[partition], heads[partition])
    return ExportPage(found, moved, start, has_more=False, offsets=offsets, lag=lag)


def filter_sql(
    filters: ExportFilter, dialect: Dialect, *, event: str = "", received: str = "received_at"
) -> Fragment:
    """The WHERE fragment (each clause prefixed ' AND ') and bound values for a filter.

    `event` is the alias of the events table in the query (empty: unqualified), whose columns
    the event filters compare; `received` is the column `received_from`/`received_to` compare
    (an entry's own: a cancellation's when reading cancellations). `kind` is the caller's to
    apply (it chooses which tables are read). Only fixed fragments are ever put into SQL;
    every value is bound, through the dialect.
    """
    column = f"{event}." if event else ""
    clauses: list[str] = []
    params: list[object] = []
    for name, value in (
        ("tenant", filters.tenant),
        ("application", filters.application),
        ("type", filters.type),
        ("subject", filters.subject),
    ):
        if value is not None:
            clauses.append(f"{column}{name} = ?")
            params.append(value)
    for clause, moment in (
        (f"{column}time >= ?", filters.time_from),
        (f"{column}time < ?", filters.time_to),
        (f"{received} >= ?", filters.received_from),
        (f"{received} < ?", filters.received_to),
    ):
        if moment is not None:
            clauses.append(clause)
            params.append(dialect.time(moment))
    if filters.tenants is not None:
        among, values = dialect.in_list(f"{column}tenant", filters.tenants)
        clauses.append(among)
        params.extend(values)
    return "".join(f" AND {clause}" for clause in clauses), params


def not_cancelled(event: str, dialect: Dialect, *, as_of: datetime | None = None) -> Fragment:
    """The predicate "the event aliased `event` is not cancelled" (at `as_of`: by a
    cancellation received before it; None: by any), with its bound values.

    The one way usage and reconciliation leave cancelled events out, written once for every
    dialect (the primary key of `cancellations` answers it). For example:

        keep, values = plan.not_cancelled("e", self.dialect)
        session.all(f"SELECT ... FROM events e WHERE {keep}{where} ...", [*values, *params])
    """
    return _cancellation_exists(event, dialect, as_of, negate=True)


def cancelled(event: str, dialect: Dialect, *, as_of: datetime | None = None) -> Fragment:
    """The predicate "the event aliased `event` is cancelled" (at `as_of`): the complement
    of `not_cancelled`, for figures that report cancelled events on their own."""
    return _cancellation_exists(event, dialect, as_of, negate=False)


def _cancellation_exists(
    event: str, dialect: Dialect, as_of: datetime | None, *, negate: bool
) -> Fragment:
    # The subquery's alias is one no caller's query uses for a table of its own.
    sql = (
        "EXISTS (SELECT 1 FROM cancellations cancelled_ "
        f"WHERE cancelled_.application = {event}.application AND cancelled_.id = {event}.id"
    )
    params: list[object] = []
    if as_of is not None:
        sql += " AND cancelled_.received_at < ?"
        params.append(dialect.time(as_of))
    return (f"NOT {sql})" if negate else f"{sql})"), params
