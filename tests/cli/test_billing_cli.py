"""`tally export`, `tally usage` and `tally reconcile` against a real `tally serve`.

The export runs against the real server, killed with SIGKILL at random points and resumed.
`reconcile` is tried against the real `GET /v1/reconciliation`, whose rows must also equal
`reconciliation_of`: an independent reconciliation computed from the export's entries with
`reconciliation_digest`. The tests of the command's own comparisons (repeated, missing and
one-sided periods, damaged files) and of how it renders usage serve those figures from `Stub`,
a local HTTP server, so that each mismatch can be made exactly.
"""

from __future__ import annotations

import csv
import json
import os
import pty
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import httpx
import pytest
from typer.testing import CliRunner, Result

from tally.cli.billing import period_of
from tally.cli.main import app
from tally.client import Client, reconciliation_digest
from tests.client.conftest import Deployment, deploy
from tests.support.server import TALLY

README = Path(__file__).resolve().parents[2] / "README.md"

NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
# Three UTC days inside the tenant's lateness window (72 h), none in the future.
TIMES = [NOW - timedelta(hours=49), NOW - timedelta(hours=25), NOW - timedelta(hours=1)]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    yield from deploy(f"sqlite:///{tmp_path / 'tally.db'}", tmp_path)


def report(deployment: Deployment, count: int, *, start: int = 0) -> list[str]:
    """`count` events of tenant acme, spread over TIMES and two types; their ids."""
    ids = []
    with Client(deployment.server.base_url, deployment.writer) as writer:
        for n in range(start, start + count):
            ids.append(
                writer.report(
                    {
                        "id": f"evt-{n:04d}",
                        "tenant": "acme",
                        "type": ("compute.seconds", "storage.gib_hours")[n % 2],
                        "quantity": f"{n}.{n % 7}1",
                        "time": TIMES[n % 3] + timedelta(seconds=n),
                        "subject": f"vm-{n % 5}",
                        "attributes": {"sku": 'std, "big"', "cores": n % 4, "gpu": n % 2 == 0},
                    }
                )
            )
        assert writer.flush().acknowledged == count
    return ids


def cli(*args: str, key: str | None = None) -> Result:
    env = {"TALLY_KEY": key} if key is not None else {}
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


def ndjson(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["ndjson", "csv"])
def test_an_export_killed_at_random_points_resumes_with_every_event_exactly_once(
    deployment: Deployment, tmp_path: Path, form: str
) -> None:
    ids = report(deployment, 300)
    out = tmp_path / f"export.{form}"
    command = [str(TALLY), "export", "--url", deployment.server.base_url, "--format", form]
    command += ["--out", str(out), "--limit", "7", "--tenant", "acme"]
    env = {**os.environ, "TALLY_KEY": deployment.reader}
    generator = random.Random(8)
    kills = 0
    for _ in range(6):
        # Kill once the file holds a random number of lines: mid-way, at whatever byte the
        # writer is then at.
        wanted = generator.randrange(1, 300)
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while process.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= wanted:
                process.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        process.communicate()
    assert kills >= 3
    finished = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stderr.decode()
    if form == "ndjson":
        entries = ndjson(out)
    else:
        with out.open(newline="") as file:
            entries = list(csv.DictReader(file))
    assert [entry["id"] for entry in entries] == ids
    checkpoint = json.loads(out.with_name(out.name + ".cursor").read_text())
    assert checkpoint["totals"]["entries"] == 300
    assert checkpoint["cursor"] == entries[-1]["cursor"]
    # Polling again brings nothing more, and repeats nothing.
    again = subprocess.run(command, env=env, capture_output=True, timeout=60, check=False)
    assert again.returncode == 0
    assert b"0 entries written" in again.stdout


def test_a_torn_last_line_and_an_unsaved_one_are_dropped_before_appending(
    deployment: Deployment, tmp_path: Path
) -> None:
    url = deployment.server.base_url
    ids = report(deployment, 10)
    out = tmp_path / "export.ndjson"
    first = cli("export", "--url", url, "--out", str(out), "--json", key=deployment.reader)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["written"] == 10
    saved = out.read_bytes()
    # What a kill leaves: a whole line written but whose cursor was never saved, then a torn
    # one. Both are beyond the cursor file's offset.
    lines = saved.splitlines(keepends=True)
    out.write_bytes(saved + lines[3] + lines[4][:20])
    nothing_new = cli("export", "--url", url, "--out", str(out), "--json", key=deployment.reader)
    assert nothing_new.exit_code == 0, nothing_new.output
    assert json.loads(nothing_new.stdout)["dropped_bytes"] == len(lines[3]) + 20
    assert out.read_bytes() == saved
    out.write_bytes(saved + lines[3] + lines[4][:20])
    ids += report(deployment, 5, start=10)
    resumed = cli("export", "--url", url, "--out", str(out), "--json", key=deployment.reader)
    assert resumed.exit_code == 0, resumed.output
    answer = json.loads(resumed.stdout)
    assert answer["written"] == 5
    assert answer["dropped_bytes"] == len(lines[3]) + 20
    assert [entry["id"] for entry in ndjson(out)] == ids


def exported_once(deployment: Deployment, tmp_path: Path, count: int) -> tuple[str, Path]:
    """`count` events reported and exported to export.ndjson: (the server's URL, the file)."""
    url = deployment.server.base_url
    report(deployment, count)
    out = tmp_path / "export.ndjson"
    assert cli("export", "--url", url, "--out", str(out), key=deployment.reader).exit_code == 0
    return url, out


def test_an_output_shorter_than_its_cursor_file_says_is_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    url, out = exported_once(deployment, tmp_path, 4)
    kept = out.read_bytes().splitlines(keepends=True)[:2]
    out.write_bytes(b"".join(kept))  # entries the cursor file counts are gone: a gap
    refused = cli("export", "--url", url, "--out", str(out), "--json", key=deployment.reader)
    assert refused.exit_code == 2
    assert "shorter" in json.loads(refused.stdout)["error"]["message"]
    assert out.read_bytes() == b"".join(kept)


def test_follow_polls_until_sigterm_then_prints_the_totals(
    deployment: Deployment, tmp_path: Path
) -> None:
    ids = report(deployment, 3)
    out = tmp_path / "export.ndjson"
    command = [str(TALLY), "export", "--url", deployment.server.base_url, "--out", str(out)]
    command += ["--follow", "--interval", "0.2", "--json"]
    env = {**os.environ, "TALLY_KEY": deployment.reader}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ids += report(deployment, 4, start=3)
        deadline = time.monotonic() + 30
        while (not out.exists() or out.read_bytes().count(b"\n") < 7) and process.poll() is None:
            assert time.monotonic() < deadline, "the new events never came"
            time.sleep(0.05)
        # A second export into the same file while the first runs would interleave them.
        second = cli("export", "--url", deployment.server.base_url, "--out", str(out),
                     "--follow", "--interval", "0.2", "--json", key=deployment.reader)  # fmt: skip
        assert second.exit_code == 1
        assert json.loads(second.stdout)["error"]["code"] == "conflict"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr.decode()
    answer = json.loads(stdout)
    assert answer["interrupted"] is True
    assert answer["totals"]["events"] == 7
    assert [entry["id"] for entry in ndjson(out)] == ids


def test_the_csv_export_reads_back_with_dictreader(deployment: Deployment, tmp_path: Path) -> None:
    report(deployment, 6)
    out = tmp_path / "export.csv"
    done = cli(
        "export", "--url", deployment.server.base_url, "--format", "csv", "--out", str(out),
        "--type", "compute.seconds", key=deployment.reader,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    with Client(deployment.server.base_url, deployment.reader) as reader:
        exported = [entry for entry, _ in reader.export(type="compute.seconds")]
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["id"] for row in rows] == [entry["id"] for entry in exported]
    assert rows[0].keys() >= {"kind", "id", "tenant", "quantity", "attributes", "cursor"}
    assert list(rows[0]) == ["kind", *list(rows[0])[1:-1], "cursor"]
    for row, entry in zip(rows, exported, strict=True):
        assert row["kind"] == "event"
        assert row["quantity"] == entry["quantity"]
        assert json.loads(row["attributes"]) == entry["attributes"]  # the comma and quotes too
    # Totals on stdout: the exact sum per type of what the file holds.
    total = sum(Decimal(entry["quantity"]) for entry in exported)
    assert "3 entries written" in done.stdout and str(total) in done.stdout


def test_an_export_refuses_to_resume_with_other_filters_or_over_a_foreign_file(
    deployment: Deployment, tmp_path: Path
) -> None:
    url, out = exported_once(deployment, tmp_path, 3)
    other = cli(
        "export", "--url", url, "--out", str(out), "--tenant", "acme", "--json",
        key=deployment.reader,
    )  # fmt: skip
    assert other.exit_code == 2
    assert json.loads(other.stdout)["error"]["code"] == "invalid-input"
    # The cursor file of another output: refused before anything of this one is cut.
    other_out = tmp_path / "other.ndjson"
    other_out.write_bytes(
        b"".join(reversed(out.read_bytes().splitlines(keepends=True))) + b"more\n"
    )
    (tmp_path / "other.ndjson.cursor").write_bytes((tmp_path / "export.ndjson.cursor").read_bytes())
    mixed = cli("export", "--url", url, "--out", str(other_out), "--json", key=deployment.reader)
    assert mixed.exit_code == 2, mixed.output
    assert "does not end where" in json.loads(mixed.stdout)["error"]["message"]
    assert other_out.read_bytes().endswith(b"more\n")
    foreign = tmp_path / "notes.ndjson"
    foreign.write_text("mine\n")
    refused = cli("export", "--url", url, "--out", str(foreign), "--json", key=deployment.reader)
    assert refused.exit_code == 2
    assert foreign.read_text() == "mine\n"
    assert "does not exist" in json.loads(refused.stdout)["error"]["message"]


def test_a_refused_key_is_an_error_that_never_shows_the_key(
    deployment: Deployment, tmp_path: Path
) -> None:
    wrong = "tly_" + "x" * 40
    refused = cli(
        "export", "--url", deployment.server.base_url, "--out", str(tmp_path / "e.ndjson"),
        "--json", key=wrong,
    )  # fmt: skip
    assert refused.exit_code == 1
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "unauthorized"
    assert wrong not in refused.output
    # The writer's key may not read: 403.
    denied = cli(
        "export", "--url", deployment.server.base_url, "--out", str(tmp_path / "f.ndjson"),
        key=deployment.writer,
    )  # fmt: skip
    assert denied.exit_code == 1
    assert deployment.writer not in denied.output
    assert "HTTP 403" in denied.stderr


# --- stand-ins for the routes still being built ---------------------------------------------------


class Stub:
    """A local HTTP server answering GET `path` with `(status, body)` (a documented shape) or
    with the NDJSON bytes a function of the query gives, and keeping each request's query;
    other paths are forwarded to `upstream` (a real server) when given."""

    def __init__(self, answers: dict[str, Any], upstream: str | None = None) -> None:
        self.answers = answers
        self.queries: list[dict[str, list[str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                where = urlsplit(self.path)
                stub.queries.append(parse_qs(where.query))
                if upstream is not None and where.path not in stub.answers:
                    names = ("authorization", "accept")
                    headers = {k: v for k, v in self.headers.items() if k.lower() in names}
                    answer = httpx.get(upstream + self.path, headers=headers, timeout=30)
                    status, data = answer.status_code, answer.content
                    kind = answer.headers["content-type"]
                elif callable(stub.answers.get(where.path)):
                    status, kind = 200, "application/x-ndjson"
                    data = stub.answers[where.path](parse_qs(where.query))
                else:
                    status, body = stub.answers.get(where.path, (404, {"title": "Not Found"}))
                    data = json.dumps(body).encode()
                    kind = "application/json" if status < 400 else "application/problem+json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                del args

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_export_from_the_ndjson_stream_resumes_from_the_lines_cursor(tmp_path: Path) -> None:
    """STAND-IN for the server's NDJSON stream until it lands: its documented lines (each
    entry with `kind` and `cursor`, a cancellation among them, then the end line)."""
    entries: list[dict[str, Any]] = [
        {"kind": "event", "id": f"e{n}", "application": "vm", "tenant": "acme", "type": "t",
         "quantity": "0.1", "time": "2026-03-01T10:00:00.000000Z", "subject": None,
         "unit": None, "region": "local", "received_at": "2026-03-01T10:00:01.000000Z",
         "attributes": {"n": n}}
        for n in range(6)
    ]  # fmt: skip
    cancellation = {"kind": "cancellation", "application": "vm", "id": "e1", "tenant": "acme",
                    "reason": 'twice, "really"', "received_at": "2026-03-01T11:00:00Z"}  # fmt: skip
    entries.insert(4, cancellation)
    served = {"upto": 5}

    def stream(query: dict[str, list[str]]) -> bytes:
        start = int(query.get("cursor", ["c0"])[0][1:])
        upto = served["upto"]
        lines = [{**e, "cursor": f"c{n + 1}"} for n, e in enumerate(entries) if start <= n < upto]
        end = {"next_cursor": f"c{max(start, upto)}", "has_more": False}
        return "".join(json.dumps(line) + "\n" for line in [*lines, end]).encode()

    stub = Stub({"/v1/events": stream})
    out = tmp_path / "stream.csv"
    command = ("export", "--url", stub.url, "--format", "csv", "--out", str(out), "--json")
    try:
        first = cli(*command, key="tly_s")
        served["upto"] = len(entries)
        second = cli(*command, key="tly_s")
    finally:
        stub.close()
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    assert json.loads(second.stdout)["totals"] == {
        "entries": 7, "events": 6, "cancellations": 1, "sums": {"t": "0.6"},
    }  # fmt: skip
    assert [q.get("cursor") for q in stub.queries] == [None, ["c5"]]
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["kind"], row["id"], row["cursor"]) for row in rows] == [
        (e["kind"], e["id"], f"c{n + 1}") for n, e in enumerate(entries)
    ]
    assert rows[4]["reason"] == 'twice, "really"' and rows[4]["quantity"] == ""
    # The CSV, its cancellation row included, reconciles with figures from the same entries.
    figures = reconciliation_of(entries, "day", "UTC")
    assert figures["rows"][0]["cancelled"]["count"] == 1
    again = Stub({"/v1/reconciliation": (200, figures)})
    try:
        day = ("--from", "2026-03-01T00:00:00Z", "--to", "2026-03-02T00:00:00Z")
        checked = cli("reconcile", "--url", again.url, "--verify", str(out), *day, key="tly_s")
    finally:
        again.close()
    assert checked.exit_code == 0, checked.output
    assert "1 period, 1 matching." in checked.stdout


def reconciliation_of(entries: list[dict[str, Any]], period: str, tz: str) -> dict[str, Any]:
    """STAND-IN for GET /v1/reconciliation until it lands: its documented rows, computed from
    the server's own export with the test's own grouping and `reconciliation_digest`."""
    zone = ZoneInfo(tz)
    cancellations = [e for e in entries if e.get("kind") == "cancellation"]
    cancelled = {(e["application"], e["id"]) for e in cancellations}
    groups: dict[tuple[str, str, datetime, datetime], list[dict[str, Any]]] = {}
    for entry in entries:
        if entry.get("kind", "event") != "event":
            continue
        moment = datetime.fromisoformat(entry["time"])
        local = moment.astimezone(zone)
        assert period == "day"
        start = datetime(local.year, local.month, local.day, tzinfo=zone)
        end = datetime.combine(start.date() + timedelta(days=1), start.timetz())
        groups.setdefault((entry["tenant"], entry["type"], start, end), []).append(entry)
    rows = []
    for (tenant, kind, start, end), members in groups.items():
        live = [e for e in members if (e["application"], e["id"]) not in cancelled]
        rows.append(
            {
                "tenant": tenant,
                "type": kind,
                "period_start": start.isoformat(),
                "period_end": end.isoformat(),
                "count": len(live),
                "sum": str(sum(Decimal(e["quantity"]) for e in live)),
                # Every cancellation may go with a period's events: it applies to the one it names.
                "digest": reconciliation_digest([*members, *cancellations]),
                "last_received_at": max(e["received_at"] for e in members),
                "cancelled": {
                    "count": len(members) - len(live),
                    "sum": str(sum(Decimal(e["quantity"]) for e in members if e not in live)),
                },
                "final": False,
                "final_at": (end + timedelta(hours=72)).isoformat(),
            }
        )
    return {"rows": rows}


@pytest.fixture
def exported(deployment: Deployment, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """An NDJSON export file of 30 events by `tally export`, and the stand-in reconciliation
    of the server's own export."""
    report(deployment, 30)
    out = tmp_path / "export.ndjson"
    done = cli("export", "--url", deployment.server.base_url, "--out", str(out),
               key=deployment.reader)  # fmt: skip
    assert done.exit_code == 0, done.output
    with Client(deployment.server.base_url, deployment.reader) as reader:
        entries = [entry for entry, _ in reader.export()]
    return out, reconciliation_of(entries, "day", "Europe/Berlin")


def reconcile(url: str, path: Path, *extra: str) -> Result:
    start, end = (TIMES[0] - timedelta(days=1)).isoformat(), (NOW + timedelta(days=1)).isoformat()
    return cli(
        "reconcile", "--url", url, "--tenant", "acme", "--from", start, "--to", end,
        "--period", "day", "--tz", "Europe/Berlin", "--verify", str(path), *extra, key="tly_r",
    )  # fmt: skip


def test_an_unaltered_export_file_reconciles(exported: tuple[Path, dict[str, Any]]) -> None:
    path, figures = exported
    stub = Stub({"/v1/reconciliation": (200, figures)})
    try:
        result = reconcile(stub.url, path, "--json")
    finally:
        stub.close()
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["matches"] is True
    assert len(answer["periods"]) == len(figures["rows"]) >= 4
    assert {p["status"] for p in answer["periods"]} == {"match"}
    (query,) = stub.queries
    assert query["tenant"] == ["acme"] and query["period"] == ["day"]
    assert query["tz"] == ["Europe/Berlin"]


def test_a_file_with_one_quantity_altered_fails_naming_its_period(
    exported: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, figures = exported
    entries = ndjson(path)
    altered = entries[7]
    altered["quantity"] = str(Decimal(altered["quantity"]) + Decimal("0.001"))
    changed = tmp_path / "altered.ndjson"
    changed.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    stub = Stub({"/v1/reconciliation": (200, figures)})
    try:
        text = reconcile(stub.url, changed)
        as_json = reconcile(stub.url, changed, "--json")
    finally:
        stub.close()
    assert text.exit_code == 1
    assert as_json.exit_code == 1
    answer = json.loads(as_json.stdout)
    assert answer["matches"] is False
    (bad,) = [p for p in answer["periods"] if p["status"] != "match"]
    start = datetime.fromisoformat(altered["time"]).astimezone(ZoneInfo("Europe/Berlin"))
    assert bad["period_start"].startswith(start.date().isoformat())
    assert bad["type"] == altered["type"]
    assert bad["differs"] == ["sum", "digest"]
    assert start.date().isoformat() in text.stdout and "differs: sum, digest" in text.stdout


def test_a_csv_file_reconciles_and_a_repeated_or_missing_event_does_not(
    deployment: Deployment, exported: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    _, figures = exported
    out = tmp_path / "export.csv"
    done = cli("export", "--url", deployment.server.base_url, "--format", "csv",
               "--out", str(out), key=deployment.reader)  # fmt: skip
    assert done.exit_code == 0, done.output
    lines = out.read_text().splitlines(keepends=True)
    # The server's CSV stream ends with a `kind` = `end` row: not an entry.
    end_row = "end" + "," * 14 + ",c-end\r\n"
    (tmp_path / "with-end.csv").write_text("".join([*lines, end_row]))
    (tmp_path / "repeated.csv").write_text("".join([*lines, lines[5]]))
    (tmp_path / "missing.csv").write_text("".join(lines[:-1]))
    stub = Stub({"/v1/reconciliation": (200, figures)})
    try:
        results = {
            name: reconcile(stub.url, tmp_path / f"{name}.csv", "--json")
            for name in ("with-end", "repeated", "missing")
        }
    finally:
        stub.close()
    assert results["with-end"].exit_code == 0, results["with-end"].output
    for name in ("repeated", "missing"):
        assert results[name].exit_code == 1, name
        (bad,) = [p for p in json.loads(results[name].stdout)["periods"] if p["status"] != "match"]
        assert "count" in bad["differs"] and "digest" in bad["differs"]


def test_a_cancellation_applies_to_the_event_it_names_wherever_it_is(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The file's cancellation (the server has none yet: written here in the documented shape)
    takes its event out of count and sum into `cancelled`, and into the digest as cancelled."""
    _, out = exported_once(deployment, tmp_path, 12)
    entries = ndjson(out)
    victim = entries[4]
    cancellation = {
        "kind": "cancellation",
        "application": victim["application"],
        "id": victim["id"],
        "tenant": "acme",
        "reason": "sent twice",
        "received_at": victim["received_at"],
        "cursor": "c-cancel",
    }
    with_it = tmp_path / "cancelled.ndjson"
    with_it.write_text(out.read_text() + json.dumps(cancellation) + "\n")
    figures = reconciliation_of([*entries, cancellation], "day", "Europe/Berlin")
    stub = Stub({"/v1/reconciliation": (200, figures)})
    try:
        matching = reconcile(stub.url, with_it, "--json")
        without = reconcile(stub.url, out, "--json")
    finally:
        stub.close()
    assert matching.exit_code == 0, matching.output
    (row,) = [p for p in json.loads(matching.stdout)["periods"] if p["tally"]["cancelled"]["count"]]
    assert row["file"]["cancelled"] == {"count": 1, "sum": victim["quantity"]}
    assert without.exit_code == 1
    (bad,) = [p for p in json.loads(without.stdout)["periods"] if p["status"] != "match"]
    assert bad["differs"] == ["count", "sum", "cancelled.count", "cancelled.sum", "digest"]


def test_json_pages_saved_one_to_a_line_reconcile(
    deployment: Deployment, exported: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    pages, cursor = [], None
    while True:
        params = {"limit": 7} | ({"cursor": cursor} if cursor else {})
        page = httpx.get(f"{deployment.server.base_url}/v1/events", params=params,
                         headers={"Authorization": f"Bearer {deployment.reader}"})  # fmt: skip
        pages.append(page.text.strip() + "\n")
        cursor = page.json()["next_cursor"]
        if not page.json()["has_more"]:
            break
    path = tmp_path / "pages.json"
    path.write_text("".join(pages))
    stub = Stub({"/v1/reconciliation": (200, exported[1])})
    try:
        result = reconcile(stub.url, path, "--json")
    finally:
        stub.close()
    assert result.exit_code == 0, result.output
    assert sum(p["file"]["count"] for p in json.loads(result.stdout)["periods"]) == 30


def test_the_live_count_shows_on_a_terminal_only(deployment: Deployment, tmp_path: Path) -> None:
    report(deployment, 20)
    command = [str(TALLY), "export", "--url", deployment.server.base_url, "--limit", "3"]
    env = {**os.environ, "TALLY_KEY": deployment.reader, "COLUMNS": "100"}
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [*command, "--out", str(tmp_path / "a.ndjson")], env=env, stdout=follower, stderr=follower
    ) as process:
        os.close(follower)
        shown = b""
        with suppress(OSError):  # EIO once the process has exited and closed the terminal
            while chunk := os.read(leader, 65536):
                shown += chunk
        process.wait(timeout=60)
    os.close(leader)
    assert process.returncode == 0, shown.decode(errors="replace")
    assert b"entries written \x1b" in shown  # the live line, styled
    assert b"20 entries written to" in shown
    piped = subprocess.run([*command, "--out", str(tmp_path / "b.ndjson")], env=env,
                           capture_output=True, timeout=60, check=False)  # fmt: skip
    assert piped.returncode == 0
    assert b"\x1b" not in piped.stdout and b"20 entries written to" in piped.stdout


def test_a_period_on_one_side_only_fails(exported: tuple[Path, dict[str, Any]]) -> None:
    path, figures = exported
    extra = dict(figures["rows"][0])
    extra["type"] = "network.bytes"
    stub = Stub({"/v1/reconciliation": (200, {"rows": [*figures["rows"], extra]})})
    try:
        result = reconcile(stub.url, path, "--json")
    finally:
        stub.close()
    assert result.exit_code == 1
    statuses = {p["type"]: p["status"] for p in json.loads(result.stdout)["periods"]}
    assert statuses["network.bytes"] == "only-in-tally"


def test_a_damaged_file_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "export.ndjson"
    path.write_text('{"kind": "event", "id": "e1"}\n{"kind": "ev')
    result = reconcile("http://127.0.0.1:9", path, "--json")
    assert result.exit_code == 2
    assert "line 2" in json.loads(result.stdout)["error"]["message"]


def test_days_follow_the_zone_across_daylight_saving() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start, end = period_of(datetime(2026, 3, 29, 12, tzinfo=UTC), "day", berlin)
    assert (start, end - start) == (datetime(2026, 3, 28, 23, tzinfo=UTC), timedelta(hours=23))
    start, end = period_of(datetime(2026, 10, 25, 12, tzinfo=UTC), "day", berlin)
    assert end - start == timedelta(hours=25)
    start, end = period_of(datetime(2026, 2, 10, tzinfo=UTC), "month", berlin)
    assert (start, end) == (
        datetime(2026, 1, 31, 23, tzinfo=UTC),
        datetime(2026, 2, 28, 23, tzinfo=UTC),
    )


# --- usage ---------------------------------------------------------------------------------------

USAGE = {
    "from": "2026-03-01T00:00:00+01:00",
    "to": "2026-03-03T00:00:00+01:00",
    "window": "day",
    "tz": "Europe/Berlin",
    "aggregation": "sum",
    "rows": [
        {
            "window_start": "2026-03-01T00:00:00+01:00",
            "window_end": "2026-03-02T00:00:00+01:00",
            "group": {"subject": "vm-1"},
            "value": "12345678901234567890.123456789012345678",
        },
        {
            "window_start": "2026-03-02T00:00:00+01:00",
            "window_end": "2026-03-03T00:00:00+01:00",
            "group": {"subject": None},
            "value": "0.3",
        },
    ],
}


def usage(url: str, *extra: str) -> Result:
    return cli(
        "usage", "--url", url, "--from", "2026-03-01T00:00:00+01:00",
        "--to", "2026-03-03T00:00:00+01:00", "--window", "day", "--tz", "Europe/Berlin",
        "--group-by", "subject", "--tenant", "acme", *extra, key="tly_u",
    )  # fmt: skip


def test_usage_as_a_table_json_and_csv() -> None:
    stub = Stub({"/v1/usage": (200, USAGE)})  # STAND-IN for GET /v1/usage until it lands
    try:
        table, as_json, as_csv = (
            usage(stub.url),
            usage(stub.url, "--json"),
            usage(stub.url, "--csv"),
        )
    finally:
        stub.close()
    assert table.exit_code == as_json.exit_code == as_csv.exit_code == 0, table.output
    assert json.loads(as_json.stdout) == USAGE
    # The widest value, whole on one line of an 80-column table.
    assert "12345678901234567890.123456789012345678" in table.stdout
    assert all(len(line) <= 80 for line in table.stdout.splitlines())
    rows = list(csv.DictReader(as_csv.stdout.splitlines()))
    assert rows[1] == {
        "window_start": "2026-03-02T00:00:00+01:00",
        "window_end": "2026-03-03T00:00:00+01:00",
        "subject": "",
        "value": "0.3",
    }
    query = stub.queries[0]
    assert query["group_by"] == ["subject"] and query["tenant"] == ["acme"]
    assert query["from"] == ["2026-02-28T23:00:00.000000Z"]


def test_usage_refused_by_tally_names_the_parameter_as_json() -> None:
    problem = {
        "type": "/problems/invalid-input",
        "title": "Invalid input",
        "status": 400,
        "detail": "The query is invalid; see errors.",
        "code": "ERR-VAL-400",
        "errors": [{"parameter": "window", "detail": "must be minute, hour, day or month"}],
    }
    stub = Stub({"/v1/usage": (400, problem)})
    try:
        result = usage(stub.url, "--json")
        text = usage(stub.url)
    finally:
        stub.close()
    assert result.exit_code == text.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "invalid-input"
    assert "window: must be minute, hour, day or month" in error["details"]
    assert "window: must be" in text.stderr
    assert "tly_u" not in result.output + text.output


def test_the_readme_billing_example_runs_as_written(deployment: Deployment, tmp_path: Path) -> None:
    """The README's block pasted into bash; only its URL changes: a stub that forwards the
    export to the real server and answers usage and reconciliation (STAND-INS until those
    routes land; then point it at the server itself)."""
    text = README.read_text(encoding="utf-8").partition("\n#### Billing operators\n")[2]
    found = re.search(r"^```sh\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert found, "no ```sh block under '#### Billing operators'"
    report(deployment, 5)
    usage_answer = {**USAGE, "rows": []}
    stub = Stub(
        {"/v1/usage": (200, usage_answer), "/v1/reconciliation": (200, {"rows": []})},
        upstream=deployment.server.base_url,
    )
    script = found.group(1).replace("http://127.0.0.1:8000", stub.url)
    env = {**os.environ, "READ": deployment.reader, "PATH": f"{TALLY.parent}:{os.environ['PATH']}"}
    try:
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path, env=env, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        stub.close()
    assert run.returncode == 0, run.stderr.decode()
    assert [entry["tenant"] for entry in ndjson(tmp_path / "acme.ndjson")] == ["acme"] * 5
    assert b"5 entries written" in run.stdout


def test_reconcile_against_the_real_route_matches_then_names_an_altered_period(
    exported: tuple[Path, dict[str, Any]], deployment: Deployment, tmp_path: Path
) -> None:
    path, independent = exported
    server = deployment.server
    made = httpx.post(
        f"{server.base_url}/v1/keys",
        json={"scopes": ["usage:read"]},
        headers={"Authorization": f"Bearer {server.admin_key}"},
    )
    assert made.status_code == 201, made.text
    usage_key = made.json()["key"]
    start, end = (TIMES[0] - timedelta(days=1)).isoformat(), (NOW + timedelta(days=1)).isoformat()
    query = {"tenant": "acme", "from": start, "to": end, "period": "day", "tz": "Europe/Berlin"}
    real = httpx.get(
        f"{server.base_url}/v1/reconciliation",
        params=query,
        headers={"Authorization": f"Bearer {usage_key}"},
    ).json()["rows"]
    # The route agrees with a reconciliation computed independently from the export.
    pick = ("tenant", "type", "count", "sum", "digest", "cancelled")
    assert sorted(tuple(str(r[k]) for k in pick) for r in real) == sorted(
        tuple(str(r[k]) for k in pick) for r in independent["rows"]
    )

    def run(file: Path) -> Result:
        return cli(
            "reconcile", "--url", server.base_url, "--tenant", "acme", "--from", start,
            "--to", end, "--period", "day", "--tz", "Europe/Berlin", "--verify", str(file),
            "--json", key=usage_key,
        )  # fmt: skip

    matched = run(path)
    assert matched.exit_code == 0, matched.output
    assert json.loads(matched.stdout)["matches"] is True

    lines = path.read_text().splitlines()
    first = json.loads(lines[0], parse_float=Decimal)
    first["quantity"] = str(Decimal(first["quantity"]) + 1)
    altered = tmp_path / "altered.ndjson"
    altered.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    differs = run(altered)
    assert differs.exit_code == 1, differs.output
    periods = json.loads(differs.stdout)["periods"]
    assert [p["status"] for p in periods].count("match") == len(periods) - 1
