"""SQLite-only: the processes writing one store take turns through its writer lock file
(store/sqlite.py, WriterLock), which each process opens for itself."""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from pathlib import Path

import pytest

from tally.errors import StoreUnavailable
from tally.events.model import Outcome
from tally.store.sqlite import SQLiteStore
from tests.store.test_conformance import NOW, new_event, read_all


def test_a_write_waits_for_the_process_that_holds_the_writer_lock(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "tally.db")
    store.migrate()
    lock = tmp_path / "tally.db-writer"

    # Another process's turn: an flock of its own open file description.
    held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    answers: list[list[Outcome]] = []
    writer = threading.Thread(
        target=lambda: answers.append(store.append([new_event("e-1")], received_at=NOW))
    )
    writer.start()
    writer.join(0.5)
    assert writer.is_alive() and answers == []  # waiting for its turn, nothing written
    assert read_all(store)[0] == []

    fcntl.flock(held, fcntl.LOCK_UN)
    os.close(held)
    writer.join(10)
    assert answers == [[Outcome.ACCEPTED]]
    assert read_all(store)[0] == ["e-1"]
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    store.close()


def test_a_forked_child_takes_its_own_turn(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "tally.db")
    store.migrate()
    store.append([new_event("parent")], received_at=NOW)  # the parent's descriptor is open
    inherited = store._writers._descriptor
    assert inherited is not None
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports and leaves at once
        try:
            with store._writers.held():
                # Through the parent's descriptor the lock is not to be had: the child holds
                # it through one of its own (re-locking a shared one would succeed).
                try:
                    fcntl.flock(inherited, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.write(write, b"shared")
                except BlockingIOError:
                    os.write(write, b"own")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert os.read(read, 16) == b"own"
    os.close(read)
    store.close()


def test_a_writer_lock_that_cannot_be_made_is_store_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "tally.db")
    store.migrate()
    store.close()
    (tmp_path / "tally.db-writer").mkdir()  # in the way of the file
    reopened = SQLiteStore(tmp_path / "tally.db")
    reopened.open()
    with pytest.raises(StoreUnavailable, match="writer lock"):
        reopened.append([new_event("e-1")], received_at=NOW)
    reopened.close()
