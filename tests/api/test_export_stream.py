"""GET /v1/events as one NDJSON or CSV stream: each entry with its own resuming cursor, cut at
any point and resumed with no gap and no repeat, read page by page; on both stores."""

from __future__ import annotations

import csv
import io
import json
import random
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.bootstrap import Services
from tally.errors import StoreUnavailable
from tally.events.log import ExportFilter, ExportPage, LogRow
from tally.services import export as export_service
from tests.api.helpers import assert_problem, auth, export_all, post_events
from tests.conftest import World, event

NDJSON = "application/x-ndjson"
CSV = "text/csv"


def seed(client: TestClient, world: World, count: int = 120) -> None:
    tenants = ["acme", "globex"]
    events = [
        event(f"s-{i:03d}", tenant=tenants[i % 2], attributes={"note": 'a, "b"; c', "n": i})
        for i in range(count)
    ]
    for start in range(0, count, 50):
        response = post_events(client, world.writer, {"events": events[start : start + 50]})
        assert response.json()["accepted"] == len(events[start : start + 50])
    for i in range(0, count, 9):  # cancellations interleave with the events in the log
        response = client.post(
            f"/v1/events/vm/s-{i:03d}/cancel",
            json={"reason": f"cancelled {i}"},
            headers=auth(world.writer),
        )
        assert response.status_code == 200, response.text


def stream_lines(
    client: TestClient, key: str, *, stop: int | None = None, **params: Any
) -> list[str]:
    """The stream's lines, or only the first `stop` (the connection closed after them)."""
    lines: list[str] = []
    with client.stream(
        "GET", "/v1/events", params=params, headers={**auth(key), "Accept": NDJSON}
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith(NDJSON)
        for line in response.iter_lines():
            if stop is not None and len(lines) == stop:
                break
            lines.append(line)
    return lines


def identity(entry: dict[str, Any]) -> tuple[str, str, str]:
    return (entry["kind"], entry["application"], entry["id"])


def test_the_ndjson_stream_holds_every_entry_with_its_cursor_then_the_end_line(
    client: TestClient, world: World
) -> None:
    seed(client, world)
    lines = [json.loads(line) for line in stream_lines(client, world.reader, limit=7)]
    *entries, end = lines
    assert set(end) == {"next_cursor", "has_more"} and end["has_more"] is False
    assert all(isinstance(e.pop("cursor"), str) for e in entries)
    # The same entries as the JSON pages, in the same order within each tenant.
    paged = export_all(client, world.reader)
    assert len(entries) == 120 + 14
    for tenant in ("acme", "globex"):
        assert [e for e in entries if e["tenant"] == tenant] == [
            e for e in paged if e["tenant"] == tenant
        ]
    # Polling with the end line's cursor: nothing new yet, then what came since.
    again = stream_lines(client, world.reader, cursor=end["next_cursor"])
    assert [json.loads(line).get("has_more") for line in again] == [False]
    post_events(client, world.writer, event("late-1"))
    later = [
        json.loads(line) for line in stream_lines(client, world.reader, cursor=end["next_cursor"])
    ]
    assert [e.get("id") for e in later[:-1]] == ["late-1"]


def test_a_stream_cut_anywhere_resumes_from_its_last_line_with_no_gap_and_no_repeat(
    client: TestClient, world: World
) -> None:
    seed(client, world)
    complete = [json.loads(line) for line in stream_lines(client, world.reader, limit=5)][:-1]
    expected = [identity(e) for e in complete]
    rng = random.Random(8)
    for _ in range(6):
        received: list[tuple[str, str, str]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": rng.choice([1, 4, 13, 1000])}
            if cursor is not None:
                params["cursor"] = cursor
            cut = rng.randint(1, 40)
            lines = [
                json.loads(line) for line in stream_lines(client, world.reader, stop=cut, **params)
            ]
            for line in lines:
                if "cursor" in line:
                    received.append(identity(line))
                    cursor = line["cursor"]
            if lines and "next_cursor" in lines[-1]:
                break
        assert received == expected


def test_filters_and_a_restricted_key_apply_to_the_stream(client: TestClient, world: World) -> None:
    seed(client, world, count=40)
    only = [
        json.loads(line) for line in stream_lines(client, world.acme_reader, kind="cancellation")
    ]
    assert {e["tenant"] for e in only[:-1]} == {"acme"}
    assert {e["kind"] for e in only[:-1]} == {"cancellation"}
    assert [identity(e) for e in only[:-1]] == [
        identity(e) for e in export_all(client, world.acme_reader, kind="cancellation")
    ]


def test_the_csv_stream_reads_back_with_the_csv_module(client: TestClient, world: World) -> None:
    seed(client, world, count=30)
    response = client.get(
        "/v1/events", params={"limit": 4}, headers={**auth(world.reader), "Accept": CSV}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(CSV)
    rows = list(csv.DictReader(io.StringIO(response.text, newline="")))
    assert rows[0].keys() >= {"kind", "id", "tenant", "quantity", "attributes", "reason", "cursor"}
    *entries, end = rows
    assert end["kind"] == "end" and end["cursor"] and end["id"] == ""
    paged = export_all(client, world.reader)
    assert [(r["kind"], r["id"]) for r in entries] == [
        (e["kind"], e["id"]) for e in paged
    ] or sorted((r["kind"], r["id"]) for r in entries) == sorted(
        (e["kind"], e["id"]) for e in paged
    )
    by_id = {(e["kind"], e["id"]): e for e in paged}
    for row in entries:
        exported = by_id[(row["kind"], row["id"])]
        if row["kind"] == "event":
            # The attributes column is the JSON text, commas, quotes and newlines intact.
            assert json.loads(row["attributes"]) == exported["attributes"]
            assert row["quantity"] == exported["quantity"] and row["reason"] == ""
        else:
            assert row["reason"] == exported["reason"] and row["quantity"] == ""
    # A row's cursor resumes right after it.
    middle = len(entries) // 2
    resumed = client.get(
        "/v1/events",
        params={"limit": 4, "cursor": entries[middle]["cursor"]},
        headers={**auth(world.reader), "Accept": CSV},
    )
    rest = list(csv.DictReader(io.StringIO(resumed.text, newline="")))
    assert [(r["kind"], r["id"]) for r in rest[:-1]] == [
        (r["kind"], r["id"]) for r in entries[middle + 1 :]
    ]


def test_refusals_before_the_first_byte_are_problem_documents(
    client: TestClient, world: World
) -> None:
    for accept in (NDJSON, CSV):
        headers = {**auth(world.reader), "Accept": accept}
        bad = client.get("/v1/events", params={"cursor": "nope"}, headers=headers)
        assert_problem(bad, 400, "ERR-VAL-400")
        other = client.get("/v1/events", params={"kind": "meter"}, headers=headers)
        assert_problem(other, 400, "ERR-VAL-400")
        backwards = client.get(
            "/v1/events",
            params={"received_from": "2026-02-01T00:00:00Z", "received_to": "2026-01-01T00:00:00Z"},
            headers=headers,
        )
        assert_problem(backwards, 400, "ERR-VAL-400")
        assert_problem(
            client.get("/v1/events", headers={**auth(world.writer), "Accept": accept}),
            403,
            "ERR-AUTH-403",
        )
    assert_problem(
        client.get("/v1/events", headers={**auth(world.reader), "Accept": "text/html"}),
        406,
        "ERR-VAL-400",
    )


def test_a_failure_mid_stream_ends_it_without_its_end_line(
    client: TestClient, world: World, services: Services, database_url: str
) -> None:
    if not database_url.startswith("sqlite:///"):
        pytest.skip("tampers with the SQLite file directly")
    seed(client, world, count=60)
    # Another event's sealed attributes on s-050's row do not open there (their associated
    # data names the event): the read of that page fails, after earlier pages went out.
    with sqlite3.connect(database_url.removeprefix("sqlite:///")) as db:
        db.execute("DROP TRIGGER events_no_update")
        db.execute(
            "UPDATE events SET attributes = (SELECT attributes FROM events WHERE id = 's-002') "
            "WHERE id = 's-050'"
        )
    lines = [json.loads(line) for line in stream_lines(client, world.reader, limit=5)]
    assert lines and all("cursor" in line for line in lines)  # no end line: cut
    assert "s-050" not in {line["id"] for line in lines}
    # Met before the first byte, the same failure is a problem document, not a cut stream.
    refused = client.get(
        "/v1/events",
        params={"limit": 100, "cursor": lines[-1]["cursor"]},
        headers={**auth(world.reader), "Accept": NDJSON},
    )
    assert refused.status_code == 500
    assert refused.headers["content-type"].startswith("application/problem+json")


def test_the_stream_reads_the_store_in_pages_of_its_limit(
    client: TestClient, world: World, services: Services
) -> None:
    seed(client, world, count=100)
    store = services.store
    reads: list[int] = []
    original = store.read_rows

    def counted(**kwargs: Any) -> ExportPage[LogRow]:
        page = original(**kwargs)
        assert kwargs["limit"] == 8 and isinstance(kwargs["filters"], ExportFilter)
        reads.append(len(page.events))
        return page

    store.read_rows = counted  # type: ignore[method-assign]
    try:
        lines = stream_lines(client, world.reader, limit=8)
    finally:
        del store.read_rows  # type: ignore[method-assign]
    assert len(lines) == 100 + 12 + 1
    assert max(reads) <= 8 and len(reads) >= (100 + 12) // 8


def test_a_read_ahead_that_fails_ends_the_stream_without_its_end_line(
    client: TestClient, world: World, services: Services
) -> None:
    """The next page is read while the reader takes the current one (services/export.py);
    its failure reaches the stream where the read itself would have."""
    seed(client, world, count=40)
    store = services.store
    original = store.read_rows
    calls = 0

    def failing(**kwargs: Any) -> ExportPage[LogRow]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise StoreUnavailable("The store went away.")
        return original(**kwargs)

    store.read_rows = failing  # type: ignore[method-assign]
    try:
        lines = [json.loads(line) for line in stream_lines(client, world.reader, limit=5)]
    finally:
        del store.read_rows  # type: ignore[method-assign]
    assert len(lines) == 10  # the two pages read, then the cut
    assert all("cursor" in line for line in lines)  # no end line


def test_a_stream_closed_with_a_read_ahead_pending_leaves_the_store_serving(
    client: TestClient, world: World, services: Services
) -> None:
    seed(client, world, count=40)

    def entries() -> list[str]:  # cursors aside: each is sealed afresh
        return [
            line["id"]
            for line in map(json.loads, stream_lines(client, world.reader, limit=7))
            if "id" in line
        ]

    whole = entries()
    principal = services.authenticator.authenticate(f"Bearer {world.reader}")
    for _ in range(20):  # more streams than read-ahead threads or pooled connections
        reads = services.export.stream(principal, ExportFilter(), cursor=None, limit=5)
        assert len(next(reads)) == 5
        reads.close()  # the reader went away: its read ahead is dropped, not waited on forever
    assert entries() == whole and len(whole) >= 40


def test_a_stream_reads_for_itself_when_every_read_ahead_thread_is_busy(
    client: TestClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(client, world, count=40)
    whole = len(stream_lines(client, world.reader, limit=7))
    busy, release = ThreadPoolExecutor(max_workers=1), threading.Event()
    busy.submit(release.wait)  # the pool's one thread, held by "another stream"
    monkeypatch.setattr(export_service, "_ahead", busy)
    try:
        assert len(stream_lines(client, world.reader, limit=7)) == whole
    finally:
        release.set()
        busy.shutdown()


def test_a_stream_read_by_another_thread_waiting_for_the_gil_completes(
    client: TestClient, world: World
) -> None:
    # A thread that keeps taking the GIL beside the stream: the stream still reads every
    # entry once, and ends with its end line.
    for first in range(0, 700, 100):
        batch = [event(f"g-{n}") for n in range(first, first + 100)]
        assert post_events(client, world.writer, {"events": batch}).status_code == 200
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(10_000))

    spinner = threading.Thread(target=busy)
    spinner.start()
    try:
        answer = client.get(
            "/v1/events",
            params={"limit": 300},
            headers={**auth(world.reader), "Accept": "application/x-ndjson"},
        )
    finally:
        stop.set()
        spinner.join()
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert sorted(line["id"] for line in lines[:-1]) == sorted(f"g-{n}" for n in range(700))
    assert lines[-1]["has_more"] is False
