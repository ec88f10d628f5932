"""Rate limits across real `tally serve` processes: shared through Redis, surviving its loss.

Two servers on one store and one Redis share a budget; a Redis killed mid-test leaves
ingestion working on in-process limits with exactly one warning; a tenant flooding its limit
does not hold back another's requests. Budgets are chosen so that refilling during a test
cannot matter (1 event a second against batches of 100), so nothing here depends on timing.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import event
from tests.ratelimit.redis_support import (
    ThrowawayRedis,
    delete_under,
    keys_under,
    require_redis,
    throwaway_redis,
    unique_prefix,
)
from tests.support.server import Server, running_server

# One event a second, a burst of 1,000 events: ten batches of 100, then (for 100 s) no more.
EVENT_BUDGET = {"TALLY_RATE_KEY_EVENTS_PER_SECOND": "1", "TALLY_RATE_KEY_EVENTS_BURST": "1000"}
RECOVERY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Keys:
    admin: str
    writer: str
    reader: str
    acme_writer: str
    globex_writer: str


def _call(server: Server, method: str, path: str, key: str, body: Any = None) -> httpx.Response:
    return httpx.request(
        method,
        f"{server.base_url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def register(server: Server) -> Keys:
    admin = server.admin_key
    for path, body in [
        ("/v1/tenants", {"id": "acme"}),
        ("/v1/tenants", {"id": "globex"}),
        ("/v1/applications", {"id": "vm"}),
    ]:
        made = _call(server, "POST", path, admin, body)
        assert made.status_code == 201, made.text

    def key(**spec: object) -> str:
        made = _call(server, "POST", "/v1/keys", admin, spec)
        assert made.status_code == 201, made.text
        secret: str = made.json()["key"]
        return secret

    return Keys(
        admin=admin,
        writer=key(scopes=["events:write"], application="vm"),
        reader=key(scopes=["events:read"]),
        acme_writer=key(scopes=["events:write"], application="vm", tenants=["acme"]),
        globex_writer=key(scopes=["events:write"], application="vm", tenants=["globex"]),
    )


def batch(prefix: str, count: int = 100) -> dict[str, Any]:
    return {"events": [event(f"{prefix}-{n}") for n in range(count)]}


def stored_ids(server: Server, reader: str) -> list[str]:
    found: list[str] = []
    query = "/v1/events?limit=10000"
    while True:
        page = _call(server, "GET", query, reader)
        assert page.status_code == 200, page.text
        body = page.json()
        found += [e["id"] for e in body["events"]]
        if not body["has_more"]:
            return found
        query = f"/v1/events?limit=10000&cursor={body['next_cursor']}"


def log_lines(server: Server, event_name: str) -> list[str]:
    return [
        line
        for line in server.stderr.read_text(errors="replace").splitlines()
        if f'"event": "{event_name}"' in line
    ]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tally.db'}"


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    """(url, a key prefix of this test's own) on the machine's Redis."""
    url = require_redis()
    prefix = unique_prefix()
    yield url, prefix
    delete_under(url, prefix)


def test_two_servers_with_one_redis_share_one_budget(
    sqlite_url: str, tmp_path: Path, shared_redis: tuple[str, str]
) -> None:
    url, prefix = shared_redis
    env = {"TALLY_REDIS_URL": url, "TALLY_REDIS_KEY_PREFIX": prefix, **EVENT_BUDGET}
    with (
        running_server(sqlite_url, tmp_path, env=env, label="first") as first,
        running_server(sqlite_url, tmp_path, env=env, label="second") as second,
    ):
        keys = register(first)
        assert_one_budget(first, second, keys, redis=shared_redis)


def assert_one_budget(
    first: Server, second: Server, keys: Keys, *, redis: tuple[str, str], label: str = "b"
) -> None:
    """Two servers sharing one store and the Redis `redis` (url, key prefix), under
    EVENT_BUDGET, give `keys.writer` one budget between them. Its batches' event ids start
    with `label` (tests/e2e/test_replicas.py runs this beside other events)."""
    url, prefix = redis
    statuses: dict[str, list[int]] = {"first": [], "second": []}
    accepted = 0
    started = time.monotonic()
    for n in range(24):  # 2,400 events: each server alone would take 1,000
        name, server = [("first", first), ("second", second)][n % 2]
        answer = _call(server, "POST", "/v1/events", keys.writer, batch(f"{label}{n}"))
        statuses[name].append(answer.status_code)
        if answer.status_code == 200:
            accepted += answer.json()["accepted"]
        else:
            assert answer.status_code == 429, answer.text
            assert answer.json()["code"] == "ERR-RATE-429"
    elapsed = time.monotonic() - started

    # The budget: the burst plus what one event a second refilled meanwhile.
    assert 1000 <= accepted <= 1000 + math.ceil(elapsed), statuses
    assert 429 in statuses["first"], statuses
    assert 429 in statuses["second"], statuses
    stored = [i for i in stored_ids(first, keys.reader) if i.startswith(label)]
    assert len(stored) == accepted  # refused batches stored nothing
    assert keys_under(url, prefix), "the limits were not kept in Redis"


def test_losing_redis_keeps_ingestion_on_in_process_limits_with_one_warning(
    sqlite_url: str, tmp_path: Path
) -> None:
    with throwaway_redis(tmp_path) as redis_server:
        _outage_scenario(sqlite_url, tmp_path, redis_server)


def _outage_scenario(sqlite_url: str, tmp_path: Path, redis_server: ThrowawayRedis) -> None:
    prefix = "tally-outage:"
    env = {
        "TALLY_REDIS_URL": redis_server.url,
        "TALLY_REDIS_KEY_PREFIX": prefix,
        "TALLY_LOG_LEVEL": "info",
        **EVENT_BUDGET,
    }
    with running_server(sqlite_url, tmp_path, env=env) as server:
        keys = register(server)
        for n in range(3):
            answer = _call(server, "POST", "/v1/events", keys.writer, batch(f"before{n}"))
            assert answer.status_code == 200, answer.text
        in_redis = keys_under(redis_server.url, prefix)
        assert in_redis, "the limits were not kept in Redis"

        redis_server.kill()
        statuses = [
            _call(server, "POST", "/v1/events", keys.writer, batch(f"during{n}")).status_code
            for n in range(12)
        ]
        # In-process limits start afresh: a full burst of ten batches, then the limit holds.
        assert statuses == [200] * 10 + [429] * 2, server.logs()
        assert len(log_lines(server, "rate_limit_store_unreachable")) == 1, server.logs()

        redis_server.start()  # same port, empty
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while not log_lines(server, "rate_limit_store_recovered"):
            assert time.monotonic() < deadline, f"never recovered\n{server.logs()}"
            answer = _call(server, "GET", "/v1/events?limit=1", keys.reader)
            assert answer.status_code == 200
            time.sleep(0.2)
        # Back on Redis, whose buckets were lost with it: the writer has a full budget there.
        answer = _call(server, "POST", "/v1/events", keys.writer, batch("after"))
        assert answer.status_code == 200, answer.text
        assert keys_under(redis_server.url, prefix)

    logs = server.stderr.read_text(errors="replace")
    [warning] = log_lines(server, "rate_limit_store_unreachable")
    assert '"level": "warning"' in warning
    assert len(log_lines(server, "rate_limit_store_recovered")) == 1
    for secret in (keys.admin, keys.writer, keys.reader):
        assert secret not in logs
    assert "tly_" not in logs
    assert not any("tly_" in key for key in in_redis)  # buckets are named by key id


def test_a_flooding_tenant_does_not_hold_back_another(sqlite_url: str, tmp_path: Path) -> None:
    # 20 requests a tenant, refilling one a second: the flood exhausts acme's at once, and
    # globex's 15 requests fit in its own budget however long the test takes.
    env = {"TALLY_RATE_TENANT_REQUESTS_PER_SECOND": "1", "TALLY_RATE_TENANT_REQUESTS_BURST": "20"}
    with running_server(sqlite_url, tmp_path, env=env) as server:
        keys = register(server)
        stop = threading.Event()
        refused = threading.Event()
        flood: list[int] = []
        lock = threading.Lock()

        def flood_acme(worker: int) -> None:
            headers = {"Authorization": f"Bearer {keys.acme_writer}"}
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client:
                for n in range(2000):
                    if stop.is_set():
                        return
                    status = client.post("/v1/events", json=event(f"a-{worker}-{n}")).status_code
                    with lock:
                        flood.append(status)
                    if status == 429:
                        refused.set()

        workers = [threading.Thread(target=flood_acme, args=(w,)) for w in range(4)]
        for worker in workers:
            worker.start()
        try:
            assert refused.wait(timeout=60), "acme was never refused"
            headers = {"Authorization": f"Bearer {keys.globex_writer}"}
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client:
                for n in range(15):
                    answer = client.post("/v1/events", json=event(f"g-{n}", tenant="globex"))
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["status"] == "accepted"
            still_flooding = not stop.is_set() and any(w.is_alive() for w in workers)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
        assert still_flooding, "the flood ended before globex was served"
        assert set(flood) == {200, 429}
