"""The COPY limits: what PostgreSQL itself takes and gives on this machine.

- COPY in: `psql \\copy` of event rows into Tally's own `events` table (a fresh database
  migrated by Tally: the same table, indexes and trigger). The rows are real Tally rows:
  `TEMPLATES` events of the big store's layout sealed with a real tenant key (sealed
  attributes, 32-byte digest, attribute tokens), repeated under new ids and log positions.
  The events table has no foreign key, so nothing else needs to exist.
- COPY out: `COPY (SELECT <the columns the export reads> FROM events) TO STDOUT` of the big
  store into /dev/null through psql.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from bench import bigstore, servers
from bench.report import Row
from tally.crypto import keyring as keyrings
from tally.services.ingest import seal_event

TEMPLATES = 2_000
COLUMNS = (
    "partition, log_offset, application, id, tenant, type, quantity, time, subject, unit, "
    "attributes, region, received_at, digest, attribute_tokens"
)


@dataclass(frozen=True)
class Copy:
    rows: int
    seconds: float
    problems: list[str]

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def row(self, key: str, scenario: str, note: str) -> Row:
        return Row(
            key=key,
            scenario=scenario,
            store="postgres",
            system="postgres",
            events_per_s=self.rows_per_s,
            count=self.rows,
            seconds=self.seconds,
            problems=self.problems,
            notes=[note],
        )


def psql(
    url: str, command: str, *, stdout: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(  # noqa: S603 - fixed argument list
        [
            shutil.which("psql") or "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            command,
        ],
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
    )


def _rows_file(url: str, workdir: Path, rows: int) -> Path:
    keyring = workdir / "copy.keyring"
    keyrings.generate(keyring)
    count = min(rows, TEMPLATES)
    layout = bigstore.Layout(events=count, tenants=20, first_month=datetime(2026, 1, 1, tzinfo=UTC))
    bigstore.prepare(url, keyring, layout.tenants)
    services = bigstore.services_of(url, keyring)
    try:
        ciphers = services.keys.ciphers_of([bigstore.tenant_id(n) for n in range(layout.tenants)])
        templates = []
        for k in range(count):
            draft = layout.draft(k)
            cipher = ciphers[draft.tenant]
            assert cipher is not None  # noqa: S101 - nothing is shredded here
            templates.append(
                seal_event(draft, application=servers.APPLICATION, region="local", cipher=cipher)
            )
    finally:
        services.close()
    path = workdir / "copy-rows.csv"
    received = datetime.now(UTC).isoformat()
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        for n in range(rows):
            e = templates[n % count]
            writer.writerow(
                (
                    n % 16,
                    n // 16 + 1,
                    e.application,
                    f"copy-{n:09d}",
                    e.tenant,
                    e.type,
                    str(e.quantity),
                    e.time.isoformat(),
                    e.subject,
                    e.unit,
                    "\\x" + e.attributes.hex(),
                    e.region,
                    received,
                    "\\x" + e.digest.hex(),
                    e.attribute_tokens,
                )
            )
    return path


def copy_in(workdir: Path, rows: int) -> Copy:
    """`psql \\copy` of `rows` realistic rows into a fresh Tally-migrated `events` table."""
    with servers.throwaway_database("copy") as url:
        path = _rows_file(url, workdir, rows)
        began = time.perf_counter()
        done = psql(url, f"\\copy events ({COLUMNS}) FROM '{path}' WITH (FORMAT csv)")
        seconds = time.perf_counter() - began
        problems = [] if done.returncode == 0 else [done.stderr.decode(errors="replace")[:300]]
        with psycopg.connect(url) as connection:
            found = connection.execute("SELECT count(*) FROM events").fetchone()
        stored = int(found[0]) if found else 0
        if stored != rows:
            problems.append(f"{stored} rows in the table after copying {rows}")
        path.unlink()
        return Copy(rows, seconds, problems)


def copy_out(url: str) -> Copy:
    """`COPY (SELECT ... FROM events) TO STDOUT` of the whole store into /dev/null."""
    with psycopg.connect(url) as connection:
        found = connection.execute("SELECT count(*) FROM events").fetchone()
    rows = int(found[0]) if found else 0
    began = time.perf_counter()
    done = psql(url, f"COPY (SELECT {COLUMNS} FROM events) TO STDOUT", stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    problems = [] if done.returncode == 0 else [done.stderr.decode(errors="replace")[:300]]
    return Copy(rows, seconds, problems)
