"""The part of appending that is the same on every store: classify, then number.

A store calls `classify` with the digests already stored for the batch's identities, inserts
the events it marks ACCEPTED, and numbers them with `number` from its partitions' counters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from tally.events.log import ExportFilter, ExportPage, partition_of
from tally.events.model import NewEvent, Outcome, StoredEvent
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


Fetch = Callable[[int, int, int], list[tuple[int, StoredEvent]]]


def read_page(
    fetch: Fetch,
    *,
    heads: Mapping[int, int],
    positions: Sequence[int],
    start: int,
    wanted: Sequence[int],
    limit: int,
) -> ExportPage:
    """One export page, read partition by partition inside one snapshot.

    `fetch(partition, after, n)` returns up to n matching (offset, event) pairs with offset >
    after, in offset order; `heads` are the partitions' last offsets in the same snapshot. A
    partition read to its end moves to its head: nothing below the head can appear later,
    because offsets are handed out in commit order (events/log.py).

    Partitions are read round-robin from `start`, and a full page hands the next page the
    partition after the one it stopped in: a busy tenant's partition cannot starve the others
    of a reader that is behind. The order is only about fairness; exactly-once rests on the
    per-partition positions alone.
    """
    found: list[StoredEvent] = []
    moved = list(positions)
    for partition in sorted(wanted, key=lambda p: (p < start, p)):
        room = limit - len(found)
        # One row more than the page has room for tells whether another page follows.
        rows = fetch(partition, positions[partition], room + 1)
        for offset, event in rows[:room]:
            moved[partition] = offset
            found.append(event)
        if len(rows) > room:
            served = room > 0
            following = (partition + 1) % len(positions) if served else partition
            return ExportPage(events=found, positions=moved, start=following, has_more=True)
        moved[partition] = max(moved[partition], heads[partition])
    return ExportPage(events=found, positions=moved, start=start, has_more=False)


def filter_sql(filters: ExportFilter, dialect: Dialect, *, table: str = "") -> Fragment:
    """The WHERE fragment (each clause prefixed ' AND ') and bound values for a filter; with
    `table`, the columns are that table's (`e` for `e.tenant`), for a query that joins.

    Only fixed fragments are ever put into SQL; every value is bound, through the dialect.
    """
    qualified = f"{table}." if table else ""
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (
        ("tenant", filters.tenant),
        ("application", filters.application),
        ("type", filters.type),
        ("subject", filters.subject),
    ):
        if value is not None:
            clauses.append(f"{qualified}{column} = ?")
            params.append(value)
    if filters.time_from is not None:
        clauses.append(f"{qualified}time >= ?")
        params.append(dialect.time(filters.time_from))
    if filters.time_to is not None:
        clauses.append(f"{qualified}time < ?")
        params.append(dialect.time(filters.time_to))
    if filters.tenants is not None:
        among, values = dialect.in_list(f"{qualified}tenant", filters.tenants)
        clauses.append(among)
        params.extend(values)
    return "".join(f" AND {clause}" for clause in clauses), params
