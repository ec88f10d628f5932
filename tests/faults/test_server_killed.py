"""Servers killed with SIGKILL under load from SDK clients: nothing acknowledged is lost, and
nothing is stored twice, though the clients resend every batch that got no answer.

- One server, killed again and again at random moments and restarted on its port, over
  SQLite and over PostgreSQL.
- Two replicas over one PostgreSQL: one is killed, and the clients (given both URLs) fail
  over to the other.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.client.conftest import ENV, exported_ids, register
from tests.support.faults import Count, Senders, kill, pause
from tests.support.server import free_port, running_server

KILLS = 2


def killed_repeatedly(database_url: str, workdir: Path, scenario: str) -> Count:
    """Start, load, SIGKILL and restart `tally serve` KILLS times, then count."""
    rng = random.Random(scenario)
    port = free_port()
    with running_server(database_url, workdir, env=ENV, port=port, label="serve-0") as first:
        writer, reader = register(first)
        senders = Senders(first.base_url, writer).__enter__()
        try:
            pause(rng, 0.5, 1.0)
            kill(first.process)
            for n in range(1, KILLS):
                with running_server(
                    database_url, workdir, env=ENV, port=port, label=f"serve-{n}"
                ) as again:
                    pause(rng, 0.3, 0.7)
                    kill(again.process)
            with running_server(
                database_url, workdir, env=ENV, port=port, label="serve-last"
            ) as last:
                pause(rng, 0.3, 0.6)
                ledger = senders.stop()
                return Count.of(scenario, ledger, exported_ids(last, reader))
        finally:
            senders.stop()


@pytest.mark.timeout(90)
def test_sqlite_server_killed_repeatedly_loses_and_doubles_nothing(tmp_path: Path) -> None:
    count = killed_repeatedly(f"sqlite:///{tmp_path / 'tally.db'}", tmp_path, "sigkill-sqlite")
    count.assert_exactly_once()


@pytest.mark.postgres
@pytest.mark.timeout(90)
def test_postgres_server_killed_repeatedly_loses_and_doubles_nothing(
    fresh_postgres: str, tmp_path: Path
) -> None:
    count = killed_repeatedly(fresh_postgres, tmp_path, "sigkill-postgres")
    count.assert_exactly_once()


@pytest.mark.postgres
@pytest.mark.timeout(90)
def test_a_replica_killed_while_clients_fail_over_to_the_other(
    fresh_postgres: str, tmp_path: Path
) -> None:
    rng = random.Random("replicas")
    with running_server(fresh_postgres, tmp_path, env=ENV, label="a") as a:
        writer, reader = register(a)
        with (
            running_server(fresh_postgres, tmp_path, env=ENV, label="b") as b,
            Senders([a.base_url, b.base_url], writer) as senders,
        ):
            pause(rng, 0.5, 1.0)
            kill(a.process)
            pause(rng, 1.0, 1.5)  # everything goes to b meanwhile
            ledger = senders.stop()
            count = Count.of("replica-killed", ledger, exported_ids(b, reader))
    count.assert_exactly_once()
    assert {client.active_base_url for client in senders.clients} == {b.base_url}
    assert senders.retries.by_status[None], "no client met the killed replica"
