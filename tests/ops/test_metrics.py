"""GET /metrics: what it counts, who may read it, that no caller's text becomes a label, and
that `tally serve --workers N` sums its workers in one scrape (docs/operations.md)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tally.api.app import create_app
from tally.auth.service import Scope
from tally.bootstrap import Services, build
from tally.errors import StoreUnavailable
from tally.metrics import (
    EVENT_OUTCOMES,
    RATE_LIMIT_KINDS,
    REJECT_REASONS,
    STORE_ERROR_KINDS,
    UNMATCHED_ROUTE,
    store_error_kind,
)
from tally.registry.models import KeyIn
from tally.settings import Settings
from tally.store.interface import EventStore
from tests.api.helpers import auth, post_events
from tests.conftest import World, event
from tests.support.server import Server, free_port, running_server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def scrape(client: TestClient | httpx.Client, key: str) -> str:
    answer = client.get("/metrics", headers=auth(key))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return answer.text


def key_id(services: Services, key: str) -> str:
    return services.authenticator.authenticate(f"Bearer {key}").key_id


def test_metrics_are_for_admin_keys_only(client: TestClient, world: World) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth(world.reader)).status_code == 403
    assert client.get("/metrics", headers=auth(world.writer)).status_code == 403
    assert "tally_build_info" in scrape(client, world.admin)


def test_every_closed_label_value_is_exposed_from_the_start(
    client: TestClient, world: World, settings: Settings
) -> None:
    samples = parse(scrape(client, world.admin))
    store = "sqlite" if settings.sqlite_path else "postgresql"

    for outcome in EVENT_OUTCOMES:
        assert ("tally_events_total", frozenset({("outcome", outcome)})) in samples
    for reason in REJECT_REASONS:
        assert ("tally_events_rejected_total", frozenset({("reason", reason)})) in samples
    for kind in STORE_ERROR_KINDS:
        assert ("tally_store_errors_total", frozenset({("kind", kind)})) in samples
    for limit in RATE_LIMIT_KINDS:
        assert ("tally_rate_limited_total", frozenset({("limit", limit)})) in samples
    assert value(samples, "tally_build_info", store=store, version="0.1.0") == 1


def test_ingest_counts_events_by_outcome_and_rejection_code(
    client: TestClient, world: World
) -> None:
    first = event("evt-m-1")
    assert post_events(client, world.writer, first).status_code == 200
    assert post_events(client, world.writer, first).status_code == 200  # duplicate
    batch = {
        "events": [
            event("evt-m-2"),
            event("evt-m-3", quantity="not a number"),  # ERR-VAL-400
            {**first, "quantity": "2"},  # the id holds other content: ERR-VAL-409
        ]
    }
    assert post_events(client, world.writer, batch).status_code == 200
    other = event("evt-m-4", tenant="globex")  # not a tenant this key may serve: ERR-AUTH-403
    assert post_events(client, world.acme_writer, other).status_code == 403

    samples = parse(scrape(client, world.admin))

    assert value(samples, "tally_events_total", outcome="accepted") == 2
    assert value(samples, "tally_events_total", outcome="duplicate") == 1
    assert value(samples, "tally_events_total", outcome="rejected") == 3
    assert value(samples, "tally_events_rejected_total", reason="ERR-VAL-400") == 1
    assert value(samples, "tally_events_rejected_total", reason="ERR-VAL-409") == 1
    assert value(samples, "tally_events_rejected_total", reason="ERR-AUTH-403") == 1
    # Three requests stored events (a duplicate is settled by the commit too), each in a
    # commit of its own: sizes and waits are observed per commit and per request.
    assert value(samples, "tally_group_commit_events_count") == 3
    assert value(samples, "tally_group_commit_events_sum") == 4
    assert value(samples, "tally_group_commit_requests_sum") == 3
    assert value(samples, "tally_group_commit_wait_seconds_count") == 3
    assert value(samples, "tally_group_commit_duration_seconds_count") == 3


def test_requests_are_counted_by_route_template_method_and_status(
    client: TestClient, world: World
) -> None:
    assert post_events(client, world.writer, event("evt-r-1")).status_code == 200
    assert client.get("/v1/events/vm/evt-r-1", headers=auth(world.reader)).status_code == 200
    assert client.get("/v1/events/vm/evt-absent", headers=auth(world.reader)).status_code == 404
    assert client.get("/no/such/route").status_code == 404
    assert client.request("BREW", "/v1/events").status_code == 405

    samples = parse(scrape(client, world.admin))

    one = "/v1/events/{application}/{event_id:path}"
    assert value(samples, "tally_http_requests_total", route=one, method="GET") == 2
    assert value(samples, "tally_http_requests_total", route=one, status="404") == 1
    assert value(samples, "tally_http_requests_total", route="/v1/events", status="200") == 1
    assert value(samples, "tally_http_requests_total", route=UNMATCHED_ROUTE, status="404") == 1
    assert value(samples, "tally_http_requests_total", method="OTHER", status="405") == 1
    # Latency by status class, with the objectives' bounds (0.25 s and 1 s) as buckets.
    histogram = "tally_http_request_duration_seconds_bucket"
    for bound in ("0.25", "1.0"):
        assert value(samples, histogram, route="/v1/events", status_class="2xx", le=bound) == 1


def test_export_lag_is_measured_for_a_key_that_reports_its_cursor(
    client: TestClient, world: World, services: Services
) -> None:
    batch = {"events": [event(f"evt-lag-{n}") for n in range(5)]}
    assert post_events(client, world.writer, batch).status_code == 200
    reader = key_id(services, world.reader)

    first = client.get("/v1/events?limit=2", headers=auth(world.reader)).json()
    assert value(parse(scrape(client, world.admin)), "tally_export_lag_entries") == 0  # no cursor
    cursor = first["next_cursor"]
    client.get("/v1/events", params={"cursor": cursor, "limit": 2}, headers=auth(world.reader))

    samples = parse(scrape(client, world.admin))
    assert value(samples, "tally_export_lag_entries", key=reader) == 3
    read_at = value(samples, "tally_export_last_read_timestamp_seconds", key=reader)
    assert abs(read_at - time.time()) < 60


def test_rate_limit_refusals_are_counted_by_limit(
    settings: Settings, store: EventStore, world: World
) -> None:
    limited = Settings(**{**settings.model_dump(), "rate_key_requests_per_second": 1})
    services = build(limited, store=store)
    scraper = services.registry.create_key(KeyIn(scopes=[Scope.ADMIN])).key  # its own budget
    try:
        with TestClient(create_app(services=services)) as client:
            statuses = [client.get("/v1/tenants", headers=auth(world.admin)).status_code]
            statuses += [client.get("/v1/tenants", headers=auth(world.admin)).status_code]
            assert statuses == [200, 429]
            samples = parse(scrape(client, scraper))
    finally:
        services.committer.close()

    assert value(samples, "tally_rate_limited_total", limit="key_requests") == 1
    assert value(samples, "tally_rate_limited_total", limit="tenant_events") == 0


def test_store_errors_are_counted_by_kind(client: TestClient, world: World) -> None:
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    services.committer.close()  # what a draining server does: appends are refused, 503

    assert post_events(client, world.writer, event("evt-late")).status_code == 503

    samples = parse(scrape(client, world.admin))
    assert value(samples, "tally_store_errors_total", kind="unavailable") == 1
    assert value(samples, "tally_http_requests_total", route="/v1/events", status="503") == 1


def test_store_error_kinds_come_from_the_error_and_not_its_message() -> None:
    assert store_error_kind(StoreUnavailable("x")) == "unavailable"
    assert store_error_kind(psycopg.errors.SerializationFailure("x")) == "conflict"
    assert store_error_kind(psycopg.errors.DeadlockDetected("x")) == "conflict"
    assert store_error_kind(psycopg.errors.UndefinedColumn("x")) == "internal"
    assert store_error_kind(sqlite3.DatabaseError("x")) == "internal"
    assert store_error_kind(ValueError("x")) is None


# --- Nothing a caller sends is a label ----------------------------------------------------

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _templates(routes: list[Any]) -> set[str]:
    """The path templates of every route, included routers' too."""
    found: set[str] = set()
    for route in routes:
        if isinstance(getattr(route, "path", None), str):
            found.add(route.path)
        inner = getattr(route, "routes", None)
        inner = inner or getattr(getattr(route, "original_router", None), "routes", None)
        found |= _templates(list(inner or []))
    return found


def test_no_value_id_key_or_tenant_text_reaches_a_label(
    client: TestClient, world: World, services: Services
) -> None:
    marker = f"hostile{secrets.token_hex(4)}"
    hostile = {
        "attributes": {f"k{marker}": f"v{marker}", "zone": f'"}}{marker}\n# HELP x'},
        "subject": f"s{marker}",
        "type": f"t.{marker}",
    }
    writer = auth(world.writer)
    post_events(client, world.writer, event(f"evt-{marker}", **hostile))
    post_events(client, world.writer, event(f"evt-{marker}", **hostile, quantity="2"))
    post_events(client, world.writer, event(f"bad id {marker}", tenant=f"tenant{marker}"))
    post_events(client, world.writer, {"events": [event(f"b-{marker}", tenant=f"x{marker}")]})
    post_events(client, world.writer, f'{{"id": "{marker}"')  # not JSON
    client.post("/v1/events", content=marker, headers={**writer, "Content-Type": marker})
    client.get(f"/v1/events/vm/{marker}", headers=auth(world.reader))
    client.get(f"/v1/events/{marker}/{marker}/{marker}", headers=auth(world.reader))
    client.get("/v1/events", params={"tenant": marker}, headers=auth(world.reader))
    client.get("/v1/events", params={"cursor": marker}, headers=auth(world.reader))
    client.get(f"/{marker}/../{marker}?{marker}={marker}", headers={"X-Request-Id": marker})
    client.get("/v1/tenants", headers={"Authorization": f"Bearer tly_{marker}"})
    client.post(f"/v1/events/vm/evt-{marker}/cancel", json={"reason": marker}, headers=writer)
    client.post("/v1/tenants", json={"id": f"t{marker}"}, headers=auth(world.admin))
    client.request(marker.upper(), "/v1/events", headers={"User-Agent": marker})
    first = client.get("/v1/events?limit=1", headers=auth(world.reader)).json()
    client.get("/v1/events", params={"cursor": first["next_cursor"]}, headers=auth(world.reader))

    text = scrape(client, world.admin)

    assert marker not in text.lower()
    for key in (world.admin, world.writer, world.reader, world.acme_reader, world.acme_writer):
        assert key not in text
    # Every label value is one of Tally's closed sets, or a key's public id.
    routes = _templates(client.app.routes) | {UNMATCHED_ROUTE}  # type: ignore[attr-defined]
    allowed = {
        "route": routes,
        "method": {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"},
        "outcome": set(EVENT_OUTCOMES),
        "reason": set(REJECT_REASONS),
        "kind": set(STORE_ERROR_KINDS),
        "limit": set(RATE_LIMIT_KINDS),
        "key": {key_id(services, world.reader)},
    }
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        for name, found in _LABEL.findall(line):
            if name in allowed:
                assert found in allowed[name], line
            elif name == "status":
                assert found.isdigit() and 100 <= int(found) <= 599, line
            elif name == "status_class":
                assert re.fullmatch(r"[1-5]xx", found), line
            else:
                assert name in {"le", "version", "python", "store"}, line


# --- A real server: workers summed, the metrics port ---------------------------------------


def _children(pid: int) -> list[int]:
    """The worker processes of a uvicorn supervisor (multiprocessing's spawned children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return sorted(found)


def _multiprocess_dir(worker: int) -> Path:
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    found = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    assert found, "a worker without PROMETHEUS_MULTIPROC_DIR"
    return Path(found[0].decode())


def _count_of_one_worker(
    directory: Path,
    pid: int,
    tmp_path: Path,
    name: str = "tally_http_requests_total",
    **labels: str,
) -> float:
    """The counter `name` (GET /healthz requests unless told) of the process `pid` alone,
    from its own file."""
    alone = Path(tempfile.mkdtemp(dir=tmp_path))
    shutil.copy(directory / f"counter_{pid}.db", alone)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(alone))
    samples = parse(generate_latest(registry).decode())
    return value(samples, name, **(labels or {"route": "/healthz"}))


def _hammer(base_url: str, requests: int, threads: int = 4) -> None:
    """`requests` GET /healthz, each on a connection of its own, from several threads."""

    def send(count: int) -> None:
        for _ in range(count):
            assert httpx.get(f"{base_url}/healthz", headers={"Connection": "close"}).is_success

    workers = [threading.Thread(target=send, args=(requests // threads,)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Server]:
    database = f"sqlite:///{tmp_path / 'tally.db'}"
    with running_server(database, tmp_path, "--workers", "2") as server:
        assert server.admin_key
        deadline = time.monotonic() + 20
        while len(_children(server.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield server


def test_one_scrape_sums_every_worker_even_one_that_died(
    two_workers: Server, tmp_path: Path
) -> None:
    server = two_workers
    workers = _children(server.process.pid)
    assert len(workers) == 2, server.logs()
    directory = _multiprocess_dir(workers[0])
    assert directory.stat().st_mode & 0o077 == 0  # private to the server's user

    per_worker: list[float] = []
    for _ in range(10):  # the kernel hands connections to either worker: until both have some
        _hammer(server.base_url, 40)
        per_worker = [_count_of_one_worker(directory, pid, tmp_path) for pid in workers]
        if all(per_worker):
            break
    assert all(per_worker), per_worker
    with server.client() as client:
        samples = parse(scrape(client, server.admin_key))
    healthz = value(samples, "tally_http_requests_total", route="/healthz")
    assert healthz == sum(per_worker) >= 40

    # A worker killed outright: uvicorn starts another; the dead one's counts stay, its
    # in-flight gauge is forgotten.
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = _children(server.process.pid)
        if len(now) == 2 and workers[0] not in now:
            break
        time.sleep(0.1)
    _hammer(server.base_url, 8)
    with server.client() as client:
        samples = parse(scrape(client, server.admin_key))

    assert value(samples, "tally_http_requests_total", route="/healthz") == healthz + 8
    assert value(samples, "tally_http_requests_in_flight") == 1  # this scrape
    assert not list(directory.glob(f"gauge_live*_{workers[0]}.db"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_metrics_port_serves_metrics_and_the_api_port_does_not(
    tmp_path: Path, workers: str
) -> None:
    database = f"sqlite:///{tmp_path / 'tally.db'}"
    port = free_port()
    env = {"TALLY_METRICS_PORT": str(port)}
    with running_server(database, tmp_path, "--workers", workers, env=env) as server:
        with server.client() as client:
            answer = client.get("/metrics", headers=auth(server.admin_key))
            assert answer.status_code == 404
            assert answer.headers["content-type"] == "application/problem+json"
            assert "/metrics" not in client.get("/openapi.json").json()["paths"]
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics")
        samples = parse(scraped.text)

    assert scraped.status_code == 200
    assert value(samples, "tally_http_requests_total", route=UNMATCHED_ROUTE, status="404") == 1
    assert value(samples, "tally_build_info", store="sqlite") == 1


def test_a_metrics_port_equal_to_the_api_port_is_refused(tmp_path: Path) -> None:
    port = free_port()
    env = {"TALLY_METRICS_PORT": str(port)}
    database = f"sqlite:///{tmp_path / 't.db'}"
    with (
        pytest.raises(RuntimeError, match="TALLY_METRICS_PORT"),
        running_server(database, tmp_path, env=env, port=port),
    ):
        pass


def test_a_forked_child_writes_its_values_to_files_of_its_own(tmp_path: Path) -> None:
    # Multiprocess values take the process id remembered by tally.metrics (no system call
    # per change), which a fork must renew: else parent and child would write one file.
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from tally.metrics import PrometheusMetrics, process_id\n"
        "metrics = PrometheusMetrics(store='sqlite', multiprocess_dir=Path(sys.argv[1]))\n"
        "metrics.events([('accepted', None)])\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    assert process_id() == os.getpid()\n"
        "    metrics.events([('accepted', None)] * 2)\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(child, 0)\n"
        "assert status == 0 and process_id() == os.getpid()\n"
        "print(os.getpid(), child)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    parent, child = (int(pid) for pid in done.stdout.split())
    counted = [
        _count_of_one_worker(tmp_path, pid, tmp_path, "tally_events_total", outcome="accepted")
        for pid in (parent, child)
    ]
    assert counted == [1, 2]
