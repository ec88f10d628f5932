"""The database stopped in immediate mode (no checkpoint: a crash) and restarted, twice, while
SDK clients send: Tally answers 503 meanwhile, the clients retry, and every acknowledged event
is stored exactly once. On a throwaway cluster (tests/support/pgcluster.py)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.client.conftest import ENV, exported_ids, register
from tests.support.faults import Count, Senders, pause
from tests.support.pgcluster import Cluster
from tests.support.server import running_server

CRASHES = 2
DOWN_SECONDS = 0.5


@pytest.mark.postgres
@pytest.mark.timeout(90)
def test_database_crashed_and_restarted_under_load_loses_and_doubles_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    rng = random.Random("database-crash")
    with running_server(cluster.url, tmp_path, env=ENV) as server:
        writer, reader = register(server)
        with Senders(server.base_url, writer) as senders:
            for _ in range(CRASHES):
                pause(rng, 0.3, 0.7)
                cluster.crash()
                time.sleep(DOWN_SECONDS)
                cluster.start()
            pause(rng, 0.3, 0.7)
            ledger = senders.stop()
        count = Count.of("database-crash", ledger, exported_ids(server, reader))
    count.assert_exactly_once()
    assert senders.retries.by_status[503], "no client met Tally's 503 while the database was down"
