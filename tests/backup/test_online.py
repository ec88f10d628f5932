"""A backup taken while writers go on is one snapshot: every table as it was at one instant.

Writers append events and cancellations in threads (the ingest and cancel services, as the API
calls them) and are made to commit during the backup; the file then holds, in every partition,
exactly the entries at offsets 1 to its high-water mark, none beyond, each as the store still
holds it, and the manifest's counts are the file's."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tally.backup import service
from tally.crypto.keyring import Keyring
from tally.events.validation import validate_event
from tally.store.snapshot import Column, Row
from tests.backup.conftest import KINDS, Clock, MakeStore, fill, serving, table_rows

pytestmark = pytest.mark.postgres

DURING = 150  # events the writers commit while the backup's snapshot is open, at least


class Writers:
    """Threads that append events (and cancel some) until stopped."""

    def __init__(self, services: Any, key: str, threads: int = 3) -> None:
        self._services = services
        self._principal = services.authenticator.authenticate(f"Bearer {key}")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.committed = 0
        self.errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, n: int) -> None:
        batch = 0
        try:
            while not self._stop.is_set():
                batch += 1
                raws = [
                    {
                        "id": f"w{n}-{batch}-{i}",
                        "tenant": ("acme", "globex")[i % 2],
                        "type": "compute.vcpu_seconds",
                        "quantity": f"{i}.{batch}",
                        "time": "2026-03-02T11:00:00Z",
                        "attributes": {"writer": n, "sku": "std"},
                    }
                    for i in range(10)
                ]
                report = self._services.ingest.ingest(
                    self._principal, [validate_event(raw) for raw in raws], [r["id"] for r in raws]
                )
                assert report.count("accepted") == len(raws)
                if batch % 3 == 0:
                    self._services.cancel.cancel(self._principal, "vm", raws[0]["id"], "again")
                with self._lock:
                    self.committed += len(raws)
        except Exception as error:  # noqa: BLE001 - any failure is the test's to report
            self.errors.append(error)

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.committed < count:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"writers committed {self.committed} of {count}"
            time.sleep(0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_a_backup_during_writes_holds_the_store_as_it_was_at_one_instant(
    make_store: MakeStore, keyring: Keyring, tmp_path: Path, kind: str
) -> None:
    source = make_store(kind)
    clock = Clock()
    path = tmp_path / "online.tbk"
    with serving(source, clock) as (services, client):
        keys = fill(services, client, clock)
        with Writers(services, keys.writer) as writers:
            writers.wait_for(100)
            waited = False

            def progress(_: int) -> None:
                # Inside the snapshot: hold the backup until the writers have committed more.
                nonlocal waited
                if not waited:
                    waited = True
                    writers.wait_for(writers.committed + DURING)

            manifest = service.take(
                source.store, path, keyring=keyring, now=clock(), progress=progress
            )
            writers.wait_for(writers.committed + 50)
        assert not writers.errors, writers.errors
    assert waited

    entries: dict[int, list[int]] = defaultdict(list)
    in_file: dict[str, list[Row]] = defaultdict(list)

    def on_rows(table: str, columns: list[Column], rows: list[Row]) -> None:
        in_file[table].extend(rows)
        if table in ("events", "cancellations"):
            at = [name for name, _ in columns]
            for row in rows:
                entries[int(row[at.index("partition")] or 0)].append(
                    int(row[at.index("log_offset")] or 0)
                )

    checked = service.read(path, keyring, on_rows=on_rows)  # counts and figures match the rows
    assert checked.figures == manifest.figures
    marks = manifest.figures.high_water_marks
    for partition, mark in enumerate(marks):
        assert sorted(entries.get(partition, [])) == list(range(1, mark + 1)), partition

    now = table_rows(source.store)
    assert len(now["events"]) > manifest.figures.tables["events"] + DURING
    for table in ("events", "cancellations"):
        # What the store holds at or below the marks is exactly what the file holds.
        # partition and log_offset are the first two columns of both tables.
        held = [row for row in now[table] if int(row[1] or 0) <= marks[int(row[0] or 0)]]
        assert held == in_file[table], table
        assert len(in_file[table]) == manifest.figures.tables[table]
    for table in ("tenants", "applications", "api_keys", "tenant_keys", "meters"):
        assert in_file[table] == now[table]
