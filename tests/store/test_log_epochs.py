"""The export log's epochs on both stores (migration 0007, store/sql.py)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from tally.events.log import ExportFilter, partition_of
from tally.store.interface import EventStore
from tests.store.test_conformance import new_event

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def heads(store: EventStore) -> list[int]:
    return store.read(
        positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=1
    ).heads


def test_a_new_store_is_in_its_first_epoch(store: EventStore) -> None:
    (first,) = store.log_epochs()
    assert (first.seq, first.reason, first.base, len(first.id)) == (1, "created", [], 16)
    page = store.read(positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=5)
    assert page.epoch == first.id
    assert page.heads == [0] * store.partitions


def test_a_renewed_epoch_begins_at_every_partitions_head(store: EventStore) -> None:
    store.append([new_event(f"e-{i}") for i in range(3)], received_at=NOW)
    store.append([new_event("g-0", tenant="globex")], received_at=NOW)

    epoch = store.renew_log_epoch(reason="restored", at=NOW)

    expected = [0] * store.partitions
    expected[partition_of("acme", store.partitions)] += 3
    expected[partition_of("globex", store.partitions)] += 1
    assert epoch.base == expected == heads(store)
    assert [e.seq for e in store.log_epochs()] == [1, 2]
    assert store.log_epochs()[-1] == epoch
    again = store.renew_log_epoch(reason="again", at=NOW)
    assert again.seq == 3 and again.id not in {e.id for e in store.log_epochs()[:-1]}
    page = store.read(positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=5)
    assert page.epoch == again.id


def test_epochs_renewed_while_appends_commit_start_on_committed_heads(store: EventStore) -> None:
    """Each epoch's base is the heads at one instant: never an offset not yet committed."""
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            store.append([new_event(f"w-{n}-{i}") for i in range(5)], received_at=NOW)
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        bases = [store.renew_log_epoch(reason=f"r{i}", at=NOW).base for i in range(10)]
    finally:
        stop.set()
        writer.join()
    acme = partition_of("acme", store.partitions)
    assert all(base[acme] % 5 == 0 for base in bases)  # whole batches only
    assert [base[acme] for base in bases] == sorted(base[acme] for base in bases)


def test_epochs_are_append_only(store: EventStore) -> None:
    session = getattr(store, "_write")  # noqa: B009 - the store's own write session
    for statement in ("UPDATE log_epochs SET reason = 'x'", "DELETE FROM log_epochs"):
        with pytest.raises(Exception) as refused, session() as writing:
            writing.run(statement)
        error: BaseException | None = refused.value
        messages = []
        while error is not None:
            messages.append(str(error))
            error = error.__cause__ or error.__context__
        assert any("log_epochs are append-only" in message for message in messages), messages
    assert len(store.log_epochs()) == 1
