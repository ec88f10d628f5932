"""The usage query's plan on SQLite: one index search of the events per window (never a scan
of the whole range per window), and one lookup per event in each attribute's labels (never a
scan of every distinct value per event). Measured before: 20,000 events in 2,880 minute
windows took 76 s with a scan per window, 0.2 s with these plans."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tally.events.log import ExportFilter
from tally.events.usage import UsageQuery
from tally.store.dialect import SQLiteDialect
from tally.store.sqlite import SQLiteStore
from tally.store.usage import usage_sql

START = datetime(2026, 3, 1, tzinfo=UTC)
WINDOWS = tuple((START + timedelta(minutes=m), START + timedelta(minutes=m + 1)) for m in range(60))


@pytest.mark.parametrize("tenant", [None, "acme"])
def test_events_are_searched_by_index_per_window_and_labels_looked_up(
    tmp_path: Path, tenant: str | None
) -> None:
    path = tmp_path / "plan.db"
    SQLiteStore(path).migrate()
    query = UsageQuery(
        filters=ExportFilter(tenant=tenant, time_from=START, time_to=START + timedelta(hours=1)),
        windows=WINDOWS,
        aggregation="latest",
        group_by=("attributes.sku",),
    )
    sql, params = usage_sql(query, {"sku": [("acme", "kabc", "v1", 0)]}, SQLiteDialect())
    with sqlite3.connect(path) as connection:
        SQLiteDialect.register(connection)
        plan = [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", params)]

    searched = [step for step in plan if step.startswith("SEARCH e USING INDEX")]
    assert searched and "time>? AND time<?" in searched[0], plan
    assert not any(step.startswith("SCAN e") for step in plan), plan
    assert any(step.startswith("SEARCH l0 USING AUTOMATIC") for step in plan), plan
