"""The primary of a pg_auto_failover formation killed under load: nothing lost, nothing doubled.

A real `tally serve` over a monitor, a primary and a synchronous secondary
(tests/support/pgaf.py), reached with the formation's multi-host URL
(`target_session_attrs=read-write`). Several SDK clients report events (retrying with the same
ids) while the primary's pg_autoctl and postmaster are SIGKILLed; the monitor promotes the
secondary; Tally, never restarted, answers 503 with Retry-After while there is no primary and
serves again once there is. Then every event the clients were told was acknowledged must be in
the export log exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tally.client import Client
from tests.conftest import IN_CI, event
from tests.ha.harness import Ledger, Probe, exported_ids, register
from tests.support.pgaf import Formation, formation
from tests.support.server import running_server

CLIENTS = 4
LOAD_BEFORE_SECONDS = 1.5
LOAD_AFTER_SECONDS = 1.5
FAILOVER_SECONDS = 30.0  # the monitor's detection, the promotion and Tally's reconnection


@pytest.fixture
def pg_formation() -> Iterator[Formation]:
    try:
        with formation() as started:
            yield started
    except FileNotFoundError as missing:  # pg_autoctl or the PostgreSQL programs
        if IN_CI:
            pytest.fail(f"pg_auto_failover is not installed under CI=true: {missing}")
        pytest.skip(f"pg_auto_failover is not installed: {missing}")


def report_until(
    base_url: str, key: str, number: int, ledger: Ledger, stop: threading.Event
) -> list[str]:
    """Report events until `stop`, then close; acknowledges what Tally acknowledged and
    returns the ids of the events handed back as failed."""
    client = Client(base_url, key, batch_size=25, max_delay=0.05, timeout=5, deadline=60)
    reported: list[str] = []
    while not stop.is_set():
        reported.append(client.report(event(f"client{number}-{len(reported)}")))
        time.sleep(0.004)
    result = client.close(timeout=60)
    failed = {str(failure.event["id"]) for failure in result.failed}
    assert result.pending == 0
    ledger.acknowledge(set(reported) - failed)
    return sorted(failed)


@pytest.mark.timeout(150)
def test_the_primary_killed_loses_and_doubles_no_acknowledged_event(
    pg_formation: Formation, tmp_path: Path
) -> None:
    with psycopg.connect(pg_formation.url) as connection:
        row = connection.execute("SHOW synchronous_standby_names").fetchone()
    assert row is not None and row[0], "the formation does not replicate synchronously"

    with running_server(pg_formation.url, tmp_path) as server:
        keys = register(server)
        ledger, stop, watcher = Ledger(), threading.Event(), Probe()
        failed: dict[int, list[str]] = {}
        threads = [
            threading.Thread(
                target=lambda n=n: failed.setdefault(
                    n, report_until(server.base_url, keys.writer, n, ledger, stop)
                )
            )
            for n in range(CLIENTS)
        ]
        threads.append(
            threading.Thread(target=watcher.run, args=(server.base_url, keys.writer, ledger, stop))
        )
        for thread in threads:
            thread.start()
        try:
            time.sleep(LOAD_BEFORE_SECONDS)
            old = pg_formation.primary()
            new = next(node for node in pg_formation.nodes if node is not old)
            killed_at = time.monotonic()
            pg_formation.kill(old)
            pg_formation.wait_for({new.name: {"wait_primary", "primary"}}, FAILOVER_SECONDS)
            promoted_at = time.monotonic()
            deadline = promoted_at + FAILOVER_SECONDS
            # Served again: a 2xx after the first refusal (a request that was committed just
            # before the kill may still be answered 2xx after it).
            refused_at = watcher.first_after(killed_at, success=False)
            assert refused_at is not None, "no request was refused while there was no primary"
            while (served_at := watcher.first_after(refused_at)) is None:
                assert time.monotonic() < deadline, "Tally did not serve after the failover"
                time.sleep(0.05)
            time.sleep(LOAD_AFTER_SECONDS)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=90)
        assert server.process.poll() is None, "Tally exited during the failover"

        with server.client(timeout=30) as client:
            stored = exported_ids(client, keys.reader)

    refusals = [a for t, a in watcher.answers if refused_at <= t < served_at]
    print(  # noqa: T201 - the suite reports the failover's timing
        f"pg_auto_failover promoted={promoted_at - killed_at:.1f}s "
        f"served={served_at - killed_at:.1f}s refusals={len(refusals)}"
    )
    for refused in refusals:
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) >= 1
    assert failed == {n: [] for n in range(CLIENTS)}
    lost, duplicated = ledger.settle(stored, "pg_auto_failover")
    assert len(ledger.acknowledged) > 100
    assert lost == 0
    assert duplicated == 0
