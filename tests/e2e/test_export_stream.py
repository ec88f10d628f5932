"""The export stream from a real `tally serve`: cut connections resumed with no gap and no
repeat, and the server's memory flat while it streams more entries than it could hold."""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tally.client import Client
from tests.client.conftest import call, register
from tests.support.server import Server


def seed(server: Server, writer: str, count: int, *, batch: int, padding: int = 0) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for start in range(0, count, batch):
        events = [
            {
                "id": f"s-{i:06d}",
                "tenant": "acme",
                "type": "compute.vcpu_seconds",
                "quantity": "1",
                "time": now,
                # Up to 256 characters per value: the padding spread over several.
                "attributes": {"n": i} | {f"p{k}": "x" * 250 for k in range(padding // 250)},
            }
            for i in range(start, min(start + batch, count))
        ]
        answer = call(server, "POST", "/v1/events", writer, json={"events": events})
        assert answer.status_code == 200, answer.status_code
        assert answer.json()["rejected"] == 0, answer.json()["events"][0]


def cut_stream(
    server: Server, reader: str, cursor: str | None, stop: int
) -> list[dict[str, object]]:
    """Up to `stop` complete lines of a stream, then the connection is closed."""
    params: dict[str, object] = {"limit": 50} | ({"cursor": cursor} if cursor else {})
    lines: list[dict[str, object]] = []
    with httpx.stream(
        "GET",
        f"{server.base_url}/v1/events",
        params=params,
        headers={"Authorization": f"Bearer {reader}", "Accept": "application/x-ndjson"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(json.loads(line))
            if len(lines) == stop:
                break
    return lines


def test_streams_cut_at_random_points_resume_with_no_gap_and_no_repeat(
    tally_server: Server,
) -> None:
    writer, reader = register(tally_server)
    seed(tally_server, writer, 600, batch=200)
    for i in range(0, 600, 7):
        made = call(
            tally_server, "POST", f"/v1/events/vm/s-{i:06d}/cancel", writer, json={"reason": "x"}
        )
        assert made.status_code == 200, made.text
    rng = random.Random(3)
    received: list[tuple[object, object]] = []
    cursor: str | None = None
    while True:
        lines = cut_stream(tally_server, reader, cursor, rng.randint(1, 180))
        for line in lines:
            if "cursor" in line:
                received.append((line["kind"], line["id"]))
                cursor = line["cursor"]  # type: ignore[assignment]
        if "next_cursor" in lines[-1]:
            break
    expected = [("event", f"s-{i:06d}") for i in range(600)]
    assert sorted(received) == sorted(
        expected + [("cancellation", f"s-{i:06d}") for i in range(0, 600, 7)]
    )
    assert len(set(received)) == len(received)
    # Within the tenant's partition, log order: each cancellation after its event.
    assert [r for r in received if r[0] == "event"] == expected


def _rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its children (a worker process, if any)."""
    total = 0
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(c) for c in (task / "children").read_text().split()]
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_the_server_streams_more_than_it_could_hold_in_flat_memory(
    tally_server: Server, database_url: str
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("one store is enough to measure the server's memory (2 shared cores)")
    writer, reader = register(tally_server)
    count, padding = 50_000, 1000
    seed(tally_server, writer, count, batch=500, padding=padding)
    pid = tally_server.process.pid
    baseline = _rss_kib(pid)
    peak = baseline
    streaming = True

    def sample() -> None:
        nonlocal peak
        while streaming:
            peak = max(peak, _rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    received = size = 0
    try:
        with httpx.stream(
            "GET",
            f"{tally_server.base_url}/v1/events",
            params={"limit": 500},
            headers={"Authorization": f"Bearer {reader}", "Accept": "application/x-ndjson"},
            timeout=120,
        ) as response:
            for line in response.iter_lines():
                size += len(line)
                received += 1
    finally:
        streaming = False
        sampler.join()
    assert received == count + 1
    # The stream was over 50 MB of text; holding it (let alone its entries as objects) would
    # grow the server by at least that. Page by page it grows by a few pages at most.
    assert size > 50 * 1024 * 1024
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 25, f"the server grew by {growth_mib:.0f} MiB while streaming"


def test_the_sdk_reads_the_stream_of_events_and_cancellations_and_resumes_from_any_entry(
    tally_server: Server,
) -> None:
    writer, reader = register(tally_server)
    seed(tally_server, writer, 30, batch=30)
    for i in range(0, 30, 4):
        made = call(
            tally_server, "POST", f"/v1/events/vm/s-{i:06d}/cancel", writer, json={"reason": "r"}
        )
        assert made.status_code == 200, made.text
    with Client(tally_server.base_url, reader) as client:
        pairs = list(client.export(limit=7))
        assert len(pairs) == 30 + 8
        kinds = [(entry["kind"], entry["id"]) for entry, _ in pairs]
        assert kinds.index(("cancellation", "s-000004")) > kinds.index(("event", "s-000004"))
        assert all("cursor" not in entry for entry, _ in pairs)
        for position in (0, 9, 20, 36):
            rest = [(e["kind"], e["id"]) for e, _ in client.export(pairs[position][1], limit=7)]
            assert rest == kinds[position + 1 :], position
        only = list(
            client.export(kind="cancellation", received_from=datetime(2000, 1, 1, tzinfo=UTC))
        )
        assert [entry["id"] for entry, _ in only] == [f"s-{i:06d}" for i in range(0, 30, 4)]
