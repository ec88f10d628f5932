"""Point-in-time recovery of Tally's PostgreSQL by pgBackRest (tests/support/pgbackrest.py),
as docs/operations.md tells an operator to do it: a full base backup while Tally serves,
archived WAL, a restore to a named restore point on a throwaway cluster, `tally epoch renew`,
and Tally serving again on the restored database with exactly the events committed before
that point, refusing the cursors of billing systems that had read further (or read the old
epoch's log) with a cursor to resume from."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.client.conftest import ENV, call, register
from tests.conftest import event, required_program
from tests.support.pgbackrest import Repository, repository
from tests.support.pgcluster import Cluster
from tests.support.server import Server, run_tally, running_server

RESTORE_POINT = "tally-pitr-target"


@pytest.fixture
def backed_up(request: pytest.FixtureRequest) -> Iterator[Repository]:
    """The throwaway cluster archiving its WAL into a pgBackRest stanza of its own."""
    required_program("pgbackrest", package="pgbackrest")  # before making a cluster for it
    cluster: Cluster = request.getfixturevalue("cluster")
    with repository(cluster) as made:
        yield made


Entry = tuple[str, str, str]
"""An export entry's identity, (kind, application, id): what a billing system dedupes by
(an event and its cancellation share the application and id)."""


def ingest(server: Server, writer: str, prefix: str, count: int) -> list[Entry]:
    """`count` new events of application vm, acknowledged (committed) by Tally."""
    ids = [f"{prefix}-{number:03d}" for number in range(count)]
    answer = call(server, "POST", "/v1/events", writer, json={"events": [event(i) for i in ids]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == count, answer.text
    return [("event", "vm", i) for i in ids]


def cancel(server: Server, writer: str, entry: Entry) -> list[Entry]:
    """The cancellation of the event `entry`, acknowledged: an entry of the log too."""
    _, application, event_id = entry
    path = f"/v1/events/{application}/{event_id}/cancel"
    answer = call(server, "POST", path, writer, json={"reason": "reported in error"})
    assert answer.status_code == 200, answer.text
    return [("cancellation", application, event_id)]


@dataclass
class Consumer:
    """A billing system reading the export page by page, keeping its cursor between polls."""

    key: str
    cursor: str | None = None
    seen: list[Entry] = field(default_factory=list)

    def read_to_end(self, server: Server) -> list[Entry]:
        """Every entry after the saved cursor, up to the end of the log; the cursor is saved
        after each page, as a billing system commits it with what it read."""
        read: list[Entry] = []
        while True:
            params = {"limit": 7} | ({"cursor": self.cursor} if self.cursor else {})
            page = call(server, "GET", "/v1/events", self.key, params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            read += [(item["kind"], item["application"], item["id"]) for item in body["events"]]
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
def test_a_point_in_time_restore_keeps_the_entries_before_the_target_and_rewinds_cursors(
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
        # Only in the archived WAL: replayed by the recovery.
        replayed = ingest(server, writer, "replayed", 15)
        replayed += cancel(server, writer, replayed[0])
        backed_up.mark(RESTORE_POINT)
        # After the target: acknowledged, read by the billing system, and not restored.
        discarded = ingest(server, writer, "discarded", 10)
        discarded += cancel(server, writer, before_backup[0])
        billing = Consumer(reader)
        assert billing.read_to_end(server) == before_backup + replayed + discarded
        # The WAL after the target is archived too: recovery has to stop at the restore
        # point, not merely run out of WAL.
        backed_up.archive_current_wal()
        high_water_before = high_water(cluster)

    cluster.stop()
    backed_up.restore(RESTORE_POINT)
    assert high_water(cluster) != high_water_before
    # The operator's procedure (docs/operations.md): restore, renew the epoch, start Tally.
    renewed = run_tally(
        cluster.url, tmp_path, "epoch", "renew", "--reason", f"PITR to {RESTORE_POINT}", env=ENV
    )
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr

    with running_server(cluster.url, tmp_path, env=ENV, label="restored") as server:
        ready = httpx.get(f"{server.base_url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert not server.admin_key, "the restored store has keys: no new admin key"
        # The keys issued before the backup work; the log is exactly what preceded the target.
        restored = Consumer(reader).read_to_end(server)
        assert restored == before_backup + replayed

        after = ingest(server, writer, "after-restore", len(discarded) + 5)
        assert Consumer(reader).read_to_end(server) == restored + after
        # The log is now past the positions the billing system had reached before: only
        # the epoch tells its cursor from one of the restored log.
        assert all(
            high_water(cluster)[partition] > offset
            for partition, offset in high_water_before.items()
            if offset
        )

        # The consumer that lagged behind the recovery point continues as it is: the log up
        # to there is the one it read, so it gets exactly what it lacked, nothing twice.
        assert lagging.read_to_end(server) == replayed + after

        for consumer, unseen in [(billing, after)]:
            had = set(consumer.seen)
            refused = call(
                server, "GET", "/v1/events", consumer.key, params={"cursor": consumer.cursor}
            )
            assert refused.status_code == 409, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            problem = refused.json()
            assert problem["type"].endswith("/problems/log-rewound"), problem
            assert problem["code"] == "ERR-VAL-409", problem
            assert problem["detail"], problem
            consumer.cursor = problem["resume_cursor"]
            resumed = consumer.read_to_end(server)
            # What it had may come again (it dedupes by identity); nothing new comes twice,
            # nothing is missing, and nothing is from outside the restored log and the new
            # events.
            assert len(resumed) == len(set(resumed)), resumed
            assert set(resumed) - had == set(unseen)
            assert set(resumed) <= set(restored + after)
