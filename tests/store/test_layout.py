"""Where appended rows lie in PostgreSQL's heap: a commit's rows in log order, so an export
read of one partition (which walks its offsets) finds them side by side, not one per page."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tally.events.log import partition_of
from tally.events.model import Outcome
from tally.store import plan
from tally.store.postgres import COPY_AT_LEAST, PostgresStore
from tests.conftest import empty_postgres
from tests.store.test_conformance import NOW, new_event


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[PostgresStore]:
    empty_postgres(postgres_url)
    store = PostgresStore(postgres_url)
    store.migrate()
    yield store
    store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("count", [COPY_AT_LEAST + 50, COPY_AT_LEAST // 5])
def test_a_commits_rows_lie_in_the_heap_in_log_order(
    pg_store: PostgresStore, postgres_url: str, count: int
) -> None:
    # Tenants in turn, so the events come with their partitions mixed.
    tenants = [f"tenant-{n}" for n in range(24)]
    for commit in range(2):
        events = [
            new_event(f"e-{commit}-{n}", tenant=tenants[n % len(tenants)]) for n in range(count)
        ]
        pg_store.append(events, received_at=NOW)

    with psycopg.connect(postgres_url) as connection:
        heap = connection.execute(
            "SELECT partition, log_offset, id FROM events ORDER BY ctid"
        ).fetchall()

    assert len(heap) == 2 * count
    assert len({partition for partition, _, _ in heap}) > 4  # the partitions were mixed
    for commit in range(2):
        rows = heap[commit * count : (commit + 1) * count]
        assert {row_id.split("-")[1] for _, _, row_id in rows} == {str(commit)}
        places = [(partition, offset) for partition, offset, _ in rows]
        assert places == sorted(places)


def test_the_accepted_events_are_taken_by_partition_each_in_the_order_it_came() -> None:
    events = [new_event(f"e-{n}", tenant=f"tenant-{n % 7}") for n in range(40)]
    outcomes = [Outcome.DUPLICATE if n % 5 == 0 else Outcome.ACCEPTED for n in range(40)]

    chosen = plan.accepted(events, outcomes, 16)

    assert sorted(chosen) == [n for n in range(40) if n % 5]
    partitions = [partition_of(events[i].tenant, 16) for i in chosen]
    assert partitions == sorted(partitions)
    for partition in set(partitions):  # within a partition: as they came (rising offsets)
        mine = [i for i, p in zip(chosen, partitions, strict=True) if p == partition]
        assert mine == sorted(mine)
