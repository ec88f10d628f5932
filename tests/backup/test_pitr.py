"""Point-in-time recovery of Tally's PostgreSQL by pgBackRest (tests/support/pgbackrest.py),
as docs/operations.md tells an operator to do it: a full base backup while Tally serves,
archived WAL, a restore to a named restore point on a throwaway cluster, and Tally serving
again on the restored database with exactly the events committed before that point."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from tests.client.conftest import ENV, call, exported_ids, register
from tests.conftest import event, required_program
from tests.support.pgbackrest import Repository, repository
from tests.support.pgcluster import Cluster
from tests.support.server import Server, running_server

RESTORE_POINT = "tally-pitr-target"


@pytest.fixture
def backed_up(request: pytest.FixtureRequest) -> Iterator[Repository]:
    """The throwaway cluster archiving its WAL into a pgBackRest stanza of its own."""
    required_program("pgbackrest", package="pgbackrest")  # before making a cluster for it
    cluster: Cluster = request.getfixturevalue("cluster")
    with repository(cluster) as made:
        yield made


def ingest(server: Server, writer: str, prefix: str, count: int) -> list[str]:
    """`count` new events, acknowledged (committed) by Tally; their ids."""
    ids = [f"{prefix}-{number:03d}" for number in range(count)]
    answer = call(server, "POST", "/v1/events", writer, json={"events": [event(i) for i in ids]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == count, answer.text
    return ids


@dataclass
class Consumer:
    """A billing system reading the export page by page, keeping its cursor between polls."""

    key: str
    cursor: str | None = None
    seen: list[str] = field(default_factory=list)

    def read_to_end(self, server: Server) -> list[str]:
        """Every entry after the saved cursor, up to the end of the log; the cursor is saved
        after each page, as a billing system commits it with what it read."""
        read: list[str] = []
        while True:
            params = {"limit": 7} | ({"cursor": self.cursor} if self.cursor else {})
            page = call(server, "GET", "/v1/events", self.key, params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            read += [entry["id"] for entry in body["events"]]
            self.cursor = body["next_cursor"]
            if not body["has_more"]:
                self.seen += read
                return read


def high_water(cluster: Cluster) -> dict[int, int]:
    """Each export-log partition's last offset, read from the store."""
    with psycopg.connect(cluster.url, connect_timeout=5) as connection:
        rows = connection.execute("SELECT partition, last_offset FROM log_partitions").fetchall()
    return {int(partition): int(offset) for partition, offset in rows}


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_a_point_in_time_restore_brings_back_exactly_the_events_before_the_target(
    backed_up: Repository, tmp_path: Path
) -> None:
    cluster = backed_up.cluster
    with running_server(cluster.url, tmp_path, env=ENV, label="before") as server:
        writer, reader = register(server)
        before_backup = ingest(server, writer, "before-backup", 20)
        lagging = Consumer(reader)  # stops reading here, before the backup
        assert lagging.read_to_end(server) == before_backup

        backup = backed_up.backup("full")
        assert backup["type"] == "full"
        replayed = ingest(server, writer, "replayed", 15)  # only in the archived WAL
        backed_up.mark(RESTORE_POINT)
        discarded = ingest(server, writer, "discarded", 10)  # after the target
        billing = Consumer(reader)
        assert billing.read_to_end(server) == before_backup + replayed + discarded
        # The WAL after the target is archived too: recovery has to stop at the restore
        # point, not merely run out of WAL.
        backed_up.archive_current_wal()
        high_water_before = high_water(cluster)

    cluster.stop()
    backed_up.restore(RESTORE_POINT)
    assert high_water(cluster) != high_water_before

    with running_server(cluster.url, tmp_path, env=ENV, label="restored") as server:
        # running_server waited for /readyz; the keys issued before the backup still work.
        assert not server.admin_key, "the restored store has keys: no new admin key"
        restored = exported_ids(server, reader)
        assert restored == before_backup + replayed
        assert not set(restored) & set(discarded)

        after = ingest(server, writer, "after-restore", len(discarded) + 5)
        assert exported_ids(server, reader) == before_backup + replayed + after
        # The log is now past the positions the billing consumer had reached before.
        assert all(
            high_water(cluster)[partition] > offset
            for partition, offset in high_water_before.items()
            if offset
        )
