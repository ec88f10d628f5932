"""The classic export trap, on the real PostgreSQL: a transaction that commits late.

A writer's transaction is held open after it has inserted its event (a test-only trigger makes
it wait for an advisory lock the test holds) while other writers commit and a reader pages to
the end. When the held transaction finally commits, the reader, resuming from its cursor
positions, must receive the held event, and nothing twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from tally.events.log import ExportFilter, partition_of
from tally.events.model import Outcome
from tally.store.postgres import PostgresStore
from tests.conftest import empty_postgres
from tests.store.test_cancellations import cancellation
from tests.store.test_conformance import NOW, new_event

HOLD_LOCK = 4242


@pytest.fixture
def held_store(postgres_url: str) -> Iterator[PostgresStore]:
    empty_postgres(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(
            f"""
            CREATE OR REPLACE FUNCTION test_hold_open() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.id LIKE 'held-%' THEN PERFORM pg_advisory_xact_lock({HOLD_LOCK}); END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_hold_open AFTER INSERT ON events
                FOR EACH ROW EXECUTE FUNCTION test_hold_open();
            """
        )
    store = PostgresStore(postgres_url).open()
    yield store
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("DROP TRIGGER test_hold_open ON events")
        connection.execute("DROP FUNCTION test_hold_open()")


def _wait_for(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def _waiting_backends(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def test_reader_receives_an_event_whose_transaction_committed_after_later_ones(
    held_store: PostgresStore, postgres_url: str
) -> None:
    store = held_store
    # Two tenants in different partitions: 'acme' (held writer and a writer queued behind it)
    # and another that commits freely meanwhile.
    other = next(
        f"t{i}"
        for i in range(100)
        if partition_of(f"t{i}", store.partitions) != partition_of("acme", store.partitions)
    )
    store.append([new_event("before", tenant="acme")], received_at=NOW)
    results: dict[str, list[Outcome]] = {}

    def write(name: str, tenant: str) -> None:
        results[name] = store.append([new_event(name, tenant=tenant)], received_at=NOW)

    with psycopg.connect(postgres_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (HOLD_LOCK,))
        held = threading.Thread(target=write, args=("held-1", "acme"))
        held.start()
        _wait_for(lambda: _waiting_backends(postgres_url) >= 1, "the held writer to block")

        queued = threading.Thread(target=write, args=("same-partition-later", "acme"))
        queued.start()
        _wait_for(lambda: _waiting_backends(postgres_url) >= 2, "the queued writer to block")
        write("other-partition", other)  # commits while held-1 is still open

        # The reader pages to the end while held-1's transaction is open.
        first = store.read(
            positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=1000
        )
        assert sorted(e.id for e in first.events) == ["before", "other-partition"]
        assert first.has_more is False

        holder.execute("SELECT pg_advisory_unlock(%s)", (HOLD_LOCK,))
    held.join(10)
    queued.join(10)

    assert results == {
        "held-1": [Outcome.ACCEPTED],
        "same-partition-later": [Outcome.ACCEPTED],
        "other-partition": [Outcome.ACCEPTED],
    }
    second = store.read(
        positions=first.positions, start=first.start, filters=ExportFilter(), limit=1000
    )
    assert [e.id for e in second.events] == ["held-1", "same-partition-later"]
    third = store.read(
        positions=second.positions, start=second.start, filters=ExportFilter(), limit=1000
    )
    assert third.events == []


def test_filtered_reader_also_receives_the_late_event(
    held_store: PostgresStore, postgres_url: str
) -> None:
    store = held_store
    store.append([new_event("before", tenant="acme")], received_at=NOW)
    acme = ExportFilter(tenant="acme")
    with psycopg.connect(postgres_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (HOLD_LOCK,))
        held = threading.Thread(
            target=store.append,
            args=([new_event("held-2", tenant="acme")],),
            kwargs={"received_at": NOW},
        )
        held.start()
        _wait_for(lambda: _waiting_backends(postgres_url) >= 1, "the held writer to block")
        first = store.read(positions=[0] * store.partitions, start=0, filters=acme, limit=10)
        holder.execute("SELECT pg_advisory_unlock(%s)", (HOLD_LOCK,))
    held.join(10)

    assert [e.id for e in first.events] == ["before"]
    second = store.read(positions=first.positions, start=first.start, filters=acme, limit=10)
    assert [e.id for e in second.events] == ["held-2"]


def test_a_late_committing_cancellation_is_not_skipped_and_keeps_commit_order(
    held_store: PostgresStore, postgres_url: str
) -> None:
    """A cancellation takes its offset from the events' counter under the same lock: while it
    is held open, a later event of its partition waits behind it, and a reader that paged to
    the end meanwhile receives the cancellation, then that event, when it resumes."""
    store = held_store
    store.append([new_event("held-3", tenant="acme")], received_at=NOW)  # no hold on insert
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(
            "CREATE TRIGGER test_hold_cancellation AFTER INSERT ON cancellations "
            "FOR EACH ROW EXECUTE FUNCTION test_hold_open()"
        )
    try:
        with psycopg.connect(postgres_url, autocommit=True) as holder:
            first = store.read(
                positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=100
            )
            holder.execute("SELECT pg_advisory_lock(%s)", (HOLD_LOCK,))
            held = threading.Thread(target=store.cancel, args=(cancellation("held-3"),))
            held.start()
            _wait_for(lambda: _waiting_backends(postgres_url) >= 1, "the cancellation to block")
            later = threading.Thread(
                target=store.append,
                args=([new_event("after", tenant="acme")],),
                kwargs={"received_at": NOW},
            )
            later.start()
            _wait_for(lambda: _waiting_backends(postgres_url) >= 2, "the event to queue")
            middle = store.read(
                positions=first.positions, start=first.start, filters=ExportFilter(), limit=100
            )
            holder.execute("SELECT pg_advisory_unlock(%s)", (HOLD_LOCK,))
        held.join(10)
        later.join(10)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            connection.execute("DROP TRIGGER test_hold_cancellation ON cancellations")

    assert [e.id for e in first.events] == ["held-3"]
    assert middle.events == []
    last = store.read(
        positions=middle.positions, start=middle.start, filters=ExportFilter(), limit=100
    )
    assert [(type(e).__name__, e.id) for e in last.events] == [
        ("Cancellation", "held-3"),
        ("StoredEvent", "after"),
    ]
