"""`tally backup` streams: its peak memory does not grow with the number of events.

Each store gets its events straight from SQL (plaintext attributes, as rows from before
encryption at rest are kept, so that making them takes no time), and `tally backup` runs as
its own process, whose peak resident set size the kernel reports when it is reaped."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tally.store import snapshot
from tests.backup.conftest import KINDS, MakeStore

pytestmark = pytest.mark.postgres

TALLY = Path(sys.executable).parent / "tally"
FEW, MANY = 6_000, 60_000
# What the larger backup may use beyond the smaller's: holding its rows would take tens of MiB.
ALLOWANCE_KB = 12 * 1024


def add_events(url: str, count: int) -> None:
    """`count` events of one tenant over three months, in partition 0, its counter moved on."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            connection.execute(
                "INSERT INTO tenants VALUES ('t0', NULL, 'local', 72, ?)",
                ("2026-01-01T00:00:00.000000Z",),
            )
            connection.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO events (partition, log_offset, application, id, tenant, type, "
                "quantity, time, subject, unit, attributes, region, received_at, digest) "
                "SELECT 0, i, 'vm', 'e-' || i, 't0', 'compute', '1.5', "
                "printf('2026-%02d-01T00:00:00.000000Z', 1 + i % 3), NULL, NULL, "
                "'{\"sku\":\"std\"}', 'local', '2026-03-01T00:00:00.000000Z', "
                "hex(randomblob(32)) FROM n",
                (count,),
            )
            connection.execute(
                "UPDATE log_partitions SET last_offset = ? WHERE partition = 0", (count,)
            )
        return
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("INSERT INTO tenants VALUES ('t0', NULL, 'local', 72, now())")
        connection.execute(
            "INSERT INTO events (partition, log_offset, application, id, tenant, type, quantity, "
            "time, subject, unit, attributes, region, received_at, digest) "
            "SELECT 0, i, 'vm', 'e-' || i, 't0', 'compute', 1.5, "
            "make_timestamptz(2026, 1 + i %% 3, 1, 0, 0, 0, 'UTC'), NULL, NULL, "
            "convert_to('{\"sku\":\"std\"}', 'UTF8'), 'local', now(), sha256(int4send(i)) "
            "FROM generate_series(1, %s) AS i",
            (count,),
        )
        connection.execute(
            "UPDATE log_partitions SET last_offset = %s WHERE partition = 0", (count,)
        )


def peak_kb(url: str, keyring: Path, out: Path) -> int:
    """The peak resident set size of `tally backup --out OUT`, in KiB."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TALLY_")}
    environment |= {"TALLY_DATABASE_URL": url, "TALLY_KEYRING": str(keyring)}
    printed, failed = out.with_suffix(".stdout"), out.with_suffix(".stderr")
    with printed.open("wb") as stdout, failed.open("wb") as stderr:
        process = subprocess.Popen(
            [str(TALLY), "backup", "--out", str(out)], env=environment, stdout=stdout, stderr=stderr
        )
    # Reaped here, not by Popen: wait4 reports this child's own peak.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, failed.read_text()
    assert "written to" in printed.read_text()
    return usage.ru_maxrss


@pytest.mark.parametrize("kind", KINDS)
def test_the_backup_of_ten_times_the_events_needs_no_more_memory(
    make_store: MakeStore, keyring_file: Path, tmp_path: Path, kind: str
) -> None:
    peaks = {}
    for count in (FEW, MANY):
        made = make_store(kind)
        add_events(made.url, count)
        peaks[count] = peak_kb(made.url, keyring_file, tmp_path / f"{count}.tbk")
        with snapshot.reading(made.store) as snap:
            assert snap.count("events") == count
    assert peaks[MANY] <= peaks[FEW] + ALLOWANCE_KB, peaks
