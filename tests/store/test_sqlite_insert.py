"""Session.insert: every row, in order, in few statements of a few shapes (store/sql.py says
why SQLite is not given one statement per row)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tally.store.dialect import SQLiteDialect
from tally.store.sql import Session


class Recording:
    """A connection that notes each statement it is given."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.statements: list[str] = []

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self.statements.append(sql)
        return self.connection.execute(sql, params)


@pytest.mark.parametrize("count", [1, 2, 3, 255, 256, 257, 1000, 1023, 2049])
def test_every_row_goes_in_in_order_in_few_statements(tmp_path: Path, count: int) -> None:
    connection = sqlite3.connect(tmp_path / "t.db")
    connection.execute("CREATE TABLE t (n INTEGER, text TEXT, blob BLOB)")
    recording = Recording(connection)
    rows = [(n, f"row {n}", bytes([n % 256])) for n in range(count)]

    Session(recording, SQLiteDialect()).insert("INSERT INTO t (n, text, blob) VALUES", rows)

    assert connection.execute("SELECT n, text, blob FROM t ORDER BY rowid").fetchall() == rows
    assert len(recording.statements) <= count // 256 + 8
    assert all(
        s.startswith("INSERT INTO t (n, text, blob) VALUES (?, ?, ?)") for s in recording.statements
    )


def test_no_rows_is_no_statement(tmp_path: Path) -> None:
    recording = Recording(sqlite3.connect(tmp_path / "t.db"))
    Session(recording, SQLiteDialect()).insert("INSERT INTO t (n) VALUES", [])
    assert recording.statements == []


def test_a_batch_uses_a_handful_of_statement_texts(tmp_path: Path) -> None:
    """So that the driver's statement cache (128) serves every batch size."""
    connection = sqlite3.connect(tmp_path / "t.db")
    connection.execute("CREATE TABLE t (n INTEGER)")
    recording = Recording(connection)
    session = Session(recording, SQLiteDialect())
    for count in range(1, 1200):
        session.insert("INSERT INTO t (n) VALUES", [(n,) for n in range(count)])
    assert len(set(recording.statements)) <= 9
