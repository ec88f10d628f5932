"""A full disk under the store: Tally answers 503 with Retry-After (a problem document, never a
500, no stack trace in its log), a refused batch stores none of its events, and once space
returns posts succeed again without a restart; SDK clients sending meanwhile lose nothing.

SQLite runs on a small tmpfs that the test fills, and, as an operator's file-size limit would
refuse writes, under an RLIMIT_FSIZE set on the running server; PostgreSQL on a throwaway
cluster whose database lives in a tablespace on a small tmpfs (WAL stays on the data folder,
as on a server whose data volume fills up), where a full disk is SQLSTATE 53100.
"""

from __future__ import annotations

import errno
import pwd
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from tally.client import new_id
from tally.store.dialect import PostgresDialect, SQLiteDialect
from tests.client.conftest import ENV, exported_ids, register
from tests.conftest import event
from tests.support import faults
from tests.support.faults import Count, Senders
from tests.support.pgcluster import Cluster
from tests.support.server import Server, running_server

PROBE_EVENTS = 400  # a batch big enough to need new pages, whatever the store has free


@dataclass
class Probe:
    """Batches posted directly, with fresh ids: the answers, and which ids each settled."""

    server: Server
    writer: str
    acknowledged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    answers: list[httpx.Response] = field(default_factory=list)

    def post(self) -> httpx.Response:
        ids = [new_id() for _ in range(PROBE_EVENTS)]
        body = {"events": [event(i, attributes={"pad": "x" * 200}) for i in ids]}
        with self.server.client(timeout=30) as client:
            answer = client.post(
                "/v1/events", json=body, headers={"Authorization": f"Bearer {self.writer}"}
            )
        self.answers.append(answer)
        if answer.status_code == 200:
            assert answer.json()["accepted"] == PROBE_EVENTS, answer.text
            self.acknowledged += ids
        else:
            self.refused += ids
        return answer

    def until(self, status: int, timeout: float = 20.0) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            answer = self.post()
            if answer.status_code == status or time.monotonic() > deadline:
                return answer
            time.sleep(0.05)


def assert_refused_as_unavailable(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert int(answer.headers["retry-after"]) >= 1
    problem = answer.json()
    assert problem["code"] == "ERR-SYS-503"
    assert problem["type"] == "/problems/service-unavailable"
    assert "Traceback" not in answer.text


def fill_and_free(
    scenario: str,
    server: Server,
    space: faults.Space,
    *,
    while_full: Callable[[], None] = lambda: None,
    told: str = "",
) -> Count:
    """Load from SDK clients and probe batches; exhaust the `space`, see a probe refused
    (its detail holding `told`), run `while_full`, restore the space, see a probe accepted
    again by the same process; then count and check."""
    writer, reader = register(server)
    probe = Probe(server, writer)
    with Senders(server.base_url, writer, clients=2, pace=0.01) as senders:
        senders.wait_for(50)
        space.exhaust()
        refused = probe.until(503)
        assert_refused_as_unavailable(refused)
        assert told in refused.json()["detail"]
        while_full()
        time.sleep(0.5)  # the SDK clients meet the full disk too
        space.restore()
        recovered = probe.until(200)
        assert recovered.status_code == 200, recovered.text
        ledger = senders.stop()
    stored = exported_ids(server, reader)
    assert server.process.poll() is None, "the server did not survive the full disk"
    assert {answer.status_code for answer in probe.answers} <= {200, 503}
    assert not set(probe.refused) & set(stored), "a refused batch was stored in part"
    logs = server.logs()
    assert "Traceback" not in logs
    assert "unhandled_error" not in logs
    ledger.add_acknowledged(probe.acknowledged)
    return Count.of(scenario, ledger, stored)


@contextmanager
def mounted(path: Path, size: str, owner: tuple[int, int] | None = None) -> Iterator[Path]:
    try:
        with faults.tmpfs(path, size, owner=owner) as folder:
            yield folder
    except PermissionError as refused:
        pytest.skip(str(refused))


@pytest.mark.timeout(60)
def test_sqlite_on_a_full_tmpfs_answers_503_then_recovers(tmp_path: Path) -> None:
    with mounted(tmp_path / "disk", "16m") as disk:
        url = f"sqlite:///{disk / 'tally.db'}"
        with running_server(url, tmp_path, env=ENV | {"TALLY_LOG_LEVEL": "info"}) as server:
            count = fill_and_free(
                "disk-full-sqlite-tmpfs",
                server,
                faults.Filling(disk),
                told="disk under the SQLite store is full",
            )
            log = server.stderr.read_text()
    # Once each: when the disk filled, and when a write succeeded again.
    assert log.count('"event": "store_full"') == 1, log
    assert log.count('"event": "store_writable_again"') == 1, log
    count.assert_exactly_once()


@pytest.mark.timeout(60)
def test_sqlite_over_its_file_size_limit_answers_503_then_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    with running_server(f"sqlite:///{folder / 'tally.db'}", tmp_path, env=ENV) as server:
        limit = faults.FileSizeLimit(server.process.pid, folder)
        count = fill_and_free("disk-full-sqlite-fsize", server, limit)
    count.assert_exactly_once()


@pytest.mark.postgres
@pytest.mark.timeout(90)
def test_postgres_with_a_full_tablespace_answers_503_then_recovers(
    cluster: Cluster, tmp_path: Path
) -> None:
    owner = pwd.getpwnam("postgres")
    space = Path(tempfile.mkdtemp(prefix="tally-pgspace-"))  # PostgreSQL can reach /tmp/…
    try:
        with mounted(space, "48m", owner=(owner.pw_uid, owner.pw_gid)) as disk:
            with psycopg.connect(cluster.url, autocommit=True) as admin:
                admin.execute(f"CREATE TABLESPACE small LOCATION '{disk}'")
                admin.execute("CREATE DATABASE tally TABLESPACE small")
            url = cluster.url.rsplit("/", 1)[0] + "/tally"

            def told_apart() -> None:
                fill = (
                    "CREATE TABLE filling AS SELECT repeat('x', 900) FROM generate_series(1, 20000)"
                )
                with (
                    pytest.raises(psycopg.OperationalError) as full,  # so: unavailable
                    psycopg.connect(url, autocommit=True) as connection,
                ):
                    connection.execute(fill)
                assert PostgresDialect().full(full.value), full.value

            with running_server(url, tmp_path, env=ENV) as server:
                count = fill_and_free(
                    "disk-full-postgres",
                    server,
                    faults.Filling(disk),
                    told="disk under the PostgreSQL store is full",
                    while_full=told_apart,
                )
        log = (cluster.datadir / "server.log").read_text(errors="replace")
    finally:
        space.rmdir()
    count.assert_exactly_once()
    assert "No space left on device" in log, "PostgreSQL never met the full disk"
    assert "PANIC" not in log


def test_sqlite_tells_a_full_database_from_a_busy_one(tmp_path: Path) -> None:
    dialect = SQLiteDialect()
    path = tmp_path / "quota.db"
    with closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as connection:
        connection.execute("CREATE TABLE t (x TEXT)")
        # SQLite's own quota: a real SQLITE_FULL, as a full disk gives, on any filesystem.
        connection.execute("PRAGMA max_page_count = 4")
        with pytest.raises(sqlite3.OperationalError) as full:
            connection.execute("INSERT INTO t SELECT zeroblob(50000)")
        with closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(sqlite3.OperationalError) as busy:
                connection.execute("BEGIN IMMEDIATE")
    assert dialect.full(full.value), full.value
    assert not dialect.full(busy.value), busy.value
    assert dialect.full(OSError(errno.ENOSPC, "No space left on device"))
    assert not dialect.full(OSError(errno.EACCES, "Permission denied"))
