"""Cancellations in the store, on both stores: an append-only export-log entry of its own,
numbered from the event's partition counter, and the one `not_cancelled` predicate."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from tally.events.log import ExportFilter, partition_of
from tally.events.model import Cancellation, StoredEvent
from tally.store import plan
from tally.store.interface import EventStore
from tally.store.sql import SQLStore
from tests.store.test_conformance import NOW, cipher, new_event


def cancellation(
    event_id: str, reason: str = "reported twice", *, tenant: str = "acme", at: object = None
) -> Cancellation:
    return Cancellation(
        application="vm",
        id=event_id,
        tenant=tenant,
        sealed_reason=cipher(tenant).seal_reason(
            application="vm", event_id=event_id, reason=reason
        ),
        received_at=NOW + timedelta(minutes=1) if at is None else at,  # type: ignore[arg-type]
    )


def entries(
    store: EventStore, filters: ExportFilter | None = None, limit: int = 1000
) -> list[tuple[str, str]]:
    """(kind, id) of every entry in export order, following positions to the end."""
    positions, start, seen = [0] * store.partitions, 0, []
    while True:
        page = store.read(
            positions=positions, start=start, filters=filters or ExportFilter(), limit=limit
        )
        seen.extend(
            ("cancellation" if isinstance(e, Cancellation) else "event", e.id) for e in page.events
        )
        positions, start = page.positions, page.start
        if not page.has_more:
            return seen


def test_a_cancellation_is_an_entry_after_its_event_in_the_same_partition(
    store: EventStore,
) -> None:
    store.append([new_event("a"), new_event("b")], received_at=NOW)
    stored, created = store.cancel(cancellation("a"))
    store.append([new_event("c")], received_at=NOW)

    assert created is True
    assert entries(store) == [("event", "a"), ("event", "b"), ("cancellation", "a"), ("event", "c")]
    # One position per partition covers both kinds: read one entry at a time, no gap, no repeat.
    assert entries(store, limit=1) == entries(store)
    # The cancellation took the partition's next offset from the events' counter.
    first = store.read(positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=3)
    partition = partition_of("acme", store.partitions)
    assert first.positions[partition] == 3
    assert isinstance(first.events[2], Cancellation)
    assert first.events[2].sealed_reason == stored.sealed_reason
    found = store.get_cancellation("vm", "a")
    assert found is not None and found.received_at == NOW + timedelta(minutes=1)
    assert (
        cipher("acme").open_reason(application="vm", event_id="a", sealed=found.sealed_reason)
        == "reported twice"
    )
    assert store.get_cancellation("vm", "b") is None


def test_cancelling_again_returns_the_first_and_appends_nothing(store: EventStore) -> None:
    store.append([new_event("a")], received_at=NOW)
    first, _ = store.cancel(cancellation("a"))
    again, created = store.cancel(cancellation("a", "another reason", at=NOW + timedelta(hours=1)))

    assert created is False
    assert again.received_at == first.received_at
    assert again.sealed_reason == first.sealed_reason
    assert entries(store) == [("event", "a"), ("cancellation", "a")]


def test_a_cancellation_of_an_unknown_event_is_refused_by_the_store(store: EventStore) -> None:
    with pytest.raises(Exception):  # noqa: B017 - each driver's integrity error
        store.cancel(cancellation("never-stored"))
    assert entries(store) == []


def test_filters_select_kinds_received_times_and_cancellations_through_their_event(
    store: EventStore,
) -> None:
    store.append(
        [new_event("a", type="x.a"), new_event("b", type="x.b", subject="vm-1")], received_at=NOW
    )
    store.cancel(cancellation("a", at=NOW + timedelta(hours=2)))
    store.cancel(cancellation("b", at=NOW + timedelta(hours=3)))

    assert entries(store, ExportFilter(kind="event")) == [("event", "a"), ("event", "b")]
    assert entries(store, ExportFilter(kind="cancellation")) == [
        ("cancellation", "a"),
        ("cancellation", "b"),
    ]
    # The event filters match a cancellation through the event it cancels.
    assert entries(store, ExportFilter(type="x.b")) == [("event", "b"), ("cancellation", "b")]
    assert entries(store, ExportFilter(subject="vm-1", kind="cancellation")) == [
        ("cancellation", "b")
    ]
    assert entries(store, ExportFilter(tenant="globex")) == []
    # received_* compare each entry's own received_at.
    late = ExportFilter(received_from=NOW + timedelta(hours=1))
    assert entries(store, late) == [("cancellation", "a"), ("cancellation", "b")]
    window = ExportFilter(received_from=NOW, received_to=NOW + timedelta(hours=2, seconds=1))
    assert entries(store, window) == [("event", "a"), ("event", "b"), ("cancellation", "a")]


def test_cancellations_are_append_only(store: EventStore) -> None:
    store.append([new_event("a")], received_at=NOW)
    store.cancel(cancellation("a"))
    assert isinstance(store, SQLStore)
    for statement in ("UPDATE cancellations SET tenant = 'x'", "DELETE FROM cancellations"):
        with pytest.raises(Exception, match="append-only"), store._write() as session:
            session.run(statement)
    assert store.get_cancellation("vm", "a") is not None


def test_not_cancelled_leaves_cancelled_events_out_as_of_a_moment(store: EventStore) -> None:
    store.append([new_event(i) for i in ("a", "b", "c")], received_at=NOW)
    store.cancel(cancellation("a", at=NOW + timedelta(hours=1)))
    store.cancel(cancellation("b", at=NOW + timedelta(hours=3)))
    assert isinstance(store, SQLStore)

    def ids(fragment: tuple[str, list[object]]) -> list[str]:
        sql, params = fragment
        with store._read() as session:
            rows = session.all(f"SELECT e.id FROM events e WHERE {sql} ORDER BY e.id", params)
        return [row["id"] for row in rows]

    d = store.dialect
    assert ids(plan.not_cancelled("e", d)) == ["c"]
    assert ids(plan.cancelled("e", d)) == ["a", "b"]
    assert ids(plan.not_cancelled("e", d, as_of=NOW + timedelta(hours=2))) == ["b", "c"]
    assert ids(plan.cancelled("e", d, as_of=NOW + timedelta(hours=2))) == ["a"]


def test_a_filter_without_the_new_fields_keeps_the_digest_cursors_were_issued_with() -> None:
    # The digest as it was computed before kind and received_* existed: a billing system's
    # saved cursor must keep working across the upgrade.
    before = hashlib.sha256("\x1f".join(["acme", *["\x00"] * 6]).encode()).digest()[:12]
    assert ExportFilter(tenant="acme").digest() == before
    assert ExportFilter(tenant="acme", kind="event").digest() != before
    assert ExportFilter(received_to=NOW).digest() != ExportFilter(received_from=NOW).digest()


def test_an_event_and_its_cancellation_read_back_as_records(store: EventStore) -> None:
    store.append([new_event("a")], received_at=NOW)
    store.cancel(cancellation("a"))
    page = store.read(positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=9)
    event, cancelled = page.events
    assert isinstance(event, StoredEvent)
    assert isinstance(cancelled, Cancellation)
    assert (cancelled.application, cancelled.id, cancelled.tenant) == ("vm", "a", "acme")
