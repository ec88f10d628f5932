"""SQLite-only: the store's open files stay bounded however many threads come and go."""

from __future__ import annotations

import threading
from pathlib import Path

from tally.store.sqlite import SQLiteStore


def open_handles(path: Path) -> int:
    """File descriptors of this process pointing at the database file."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if fd.readlink() == path:
                count += 1
        except OSError:
            continue
    return count


def test_short_lived_threads_do_not_leave_connections_open(tmp_path: Path) -> None:
    path = tmp_path / "tally.db"
    store = SQLiteStore(path)
    store.migrate()

    def read() -> None:
        store.list_tenants()
        store.find_key(b"\x00" * 32)

    # A server's worker threads are retired and replaced; each new one reads once.
    for _ in range(100):
        worker = threading.Thread(target=read)
        worker.start()
        worker.join()

    assert open_handles(path) <= 3
    store.close()
    assert open_handles(path) == 0
