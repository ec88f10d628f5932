"""Two `tally serve` processes on different ports over one PostgreSQL database (and one
Redis) behave as one service (docs/operations.md, Replicas): an event sent to both is stored
once, a cursor issued by one continues on the other, a key revoked on one is refused by it
at once and by the other within TALLY_CACHE_SECONDS, and rate limits are one budget."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import event, new_database
from tests.e2e.test_ratelimit import EVENT_BUDGET, Keys, assert_one_budget, register
from tests.e2e.test_ratelimit import _call as call
from tests.ratelimit.redis_support import delete_under, require_redis, unique_prefix
from tests.support.server import Server, running_server

# How long a replica may answer from its copy of a key (TALLY_CACHE_SECONDS), set here so the
# test proves the bound it sets rather than the default.
CACHE_SECONDS = 2.0

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class Replicas:
    a: Server
    b: Server
    keys: Keys
    redis: tuple[str, str]  # url, key prefix

    def call(
        self, server: Server, method: str, path: str, key: str, body: Any = None
    ) -> httpx.Response:
        return call(server, method, path, key, body)

    def new_key(self, **spec: object) -> tuple[str, str]:
        """(id, secret) of a new key, issued through replica a."""
        made = self.call(self.a, "POST", "/v1/keys", self.keys.admin, spec)
        assert made.status_code == 201, made.text
        return made.json()["id"], made.json()["key"]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    redis_url, prefix = require_redis(), unique_prefix()
    workdir: Path = tmp_path_factory.mktemp("replicas")
    env = {
        "TALLY_REDIS_URL": redis_url,
        "TALLY_REDIS_KEY_PREFIX": prefix,
        "TALLY_CACHE_SECONDS": str(CACHE_SECONDS),
        **EVENT_BUDGET,
    }
    try:
        with (
            new_database("tally_replicas") as url,
            running_server(url, workdir, env=env, label="a") as a,
            running_server(url, workdir, env=env, label="b") as b,
        ):
            yield Replicas(a, b, register(a), (redis_url, prefix))
    finally:
        delete_under(redis_url, prefix)


def test_the_same_events_sent_to_both_replicas_at_once_are_stored_once(
    replicas: Replicas,
) -> None:
    _, writer = replicas.new_key(scopes=["events:write"], application="vm")
    body = {"events": [event(f"dup-{n}") for n in range(300)]}
    answers: dict[str, httpx.Response] = {}
    start = threading.Barrier(2)

    def send(name: str, server: Server) -> None:
        start.wait()
        answers[name] = replicas.call(server, "POST", "/v1/events", writer, body)

    threads = [
        threading.Thread(target=send, args=item) for item in (("a", replicas.a), ("b", replicas.b))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    outcomes: dict[str, Counter[str]] = {f"dup-{n}": Counter() for n in range(300)}
    for answer in answers.values():
        assert answer.status_code == 200, answer.text
        for sent, outcome in zip(body["events"], answer.json()["events"], strict=True):
            outcomes[str(sent["id"])][outcome["status"]] += 1
    assert all(c == Counter(accepted=1, duplicate=1) for c in outcomes.values()), outcomes
    one = replicas.call(replicas.b, "GET", "/v1/events/vm/dup-7", replicas.keys.reader)
    assert one.status_code == 200, one.text


def test_a_cursor_issued_by_one_replica_continues_on_the_other(replicas: Replicas) -> None:
    _, writer = replicas.new_key(scopes=["events:write"], application="vm")
    kind = "replica.cursor"

    def post(server: Server, ids: list[str]) -> None:
        body = {"events": [event(i, type=kind) for i in ids]}
        answer = replicas.call(server, "POST", "/v1/events", writer, body)
        assert answer.status_code == 200 and answer.json()["accepted"] == len(ids), answer.text

    def follow(cursor: str | None, turn: int) -> tuple[list[str], str | None]:
        """Every page from `cursor` on, asking the replicas in turn; the ids and last cursor."""
        read: list[str] = []
        while True:
            server = (replicas.a, replicas.b)[turn % 2]
            turn += 1
            query = f"/v1/events?type={kind}&limit=4" + (f"&cursor={cursor}" if cursor else "")
            page = replicas.call(server, "GET", query, replicas.keys.reader)
            assert page.status_code == 200, page.text
            read += [entry["id"] for entry in page.json()["events"]]
            cursor = page.json()["next_cursor"] or cursor
            if not page.json()["has_more"]:
                return read, cursor

    first = [f"cur-{n}" for n in range(18)]
    post(replicas.a, first)
    read, cursor = follow(None, turn=0)
    assert read == first  # five pages, from a, b, a, b, a: no gap, no repeat

    later = [f"cur-later-{n}" for n in range(6)]
    post(replicas.b, later)
    more, _ = follow(cursor, turn=1)  # the last cursor came from a; b continues it
    assert more == later


def test_a_key_revoked_on_one_replica_is_refused_by_it_at_once_and_by_both_within_the_bound(
    replicas: Replicas,
) -> None:
    key_id, reader = replicas.new_key(scopes=["events:read"])
    for server in (replicas.a, replicas.b):
        assert replicas.call(server, "GET", "/v1/events?limit=1", reader).status_code == 200

    revoked = replicas.call(replicas.a, "DELETE", f"/v1/keys/{key_id}", replicas.keys.admin)
    assert revoked.status_code == 204, revoked.text
    done = time.monotonic()
    # The replica that revoked it dropped its copy of the key with the change.
    refused = replicas.call(replicas.a, "GET", "/v1/events?limit=1", reader)
    assert refused.status_code == 401, refused.text
    # The other answers from its copy for at most TALLY_CACHE_SECONDS (freshness.py).
    while (
        answer := replicas.call(replicas.b, "GET", "/v1/events?limit=1", reader)
    ).status_code == 200:
        assert time.monotonic() - done < CACHE_SECONDS, "replica b still takes the revoked key"
        time.sleep(0.05)
    assert answer.status_code == 401, answer.text
    assert answer.json()["code"] == "ERR-AUTH-401"
    assert replicas.call(replicas.a, "GET", "/v1/events?limit=1", reader).status_code == 401


def test_rate_limits_are_one_budget_across_replicas(replicas: Replicas) -> None:
    assert_one_budget(replicas.a, replicas.b, replicas.keys, redis=replicas.redis, label="budget-")
