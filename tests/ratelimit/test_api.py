"""Rate limits seen from the API: 429 problem documents, RateLimit fields, nothing stored.

In-process limiter on the test's frozen clock (conftest.py), so budgets refill only when a test
advances it; limits come from each test's `limits` marker.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tally.auth.service import Scope
from tally.bootstrap import Services
from tally.registry.models import KeyIn
from tests.api.helpers import assert_problem, auth, export_all, post_events
from tests.conftest import World, event
from tests.ratelimit.conftest import Clock

OFF = {
    "rate_key_requests_per_second": 0,
    "rate_key_events_per_second": 0,
    "rate_tenant_requests_per_second": 0,
    "rate_tenant_events_per_second": 0,
}


def assert_rate_limited(response: httpx.Response, *, limit: int) -> dict[str, Any]:
    problem = assert_problem(response, 429, "ERR-RATE-429")
    assert problem["type"] == "/problems/rate-limited"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["ratelimit-limit"] == str(limit)
    assert int(response.headers["ratelimit-remaining"]) >= 0
    assert int(response.headers["ratelimit-reset"]) >= 1
    return problem


def fields(response: httpx.Response) -> tuple[int, int, int]:
    headers = response.headers
    return (
        int(headers["ratelimit-limit"]),
        int(headers["ratelimit-remaining"]),
        int(headers["ratelimit-reset"]),
    )


def batch(prefix: str, count: int, **fields: object) -> dict[str, object]:
    return {"events": [event(f"{prefix}-{n}", **fields) for n in range(count)]}


def writer_for(services: Services, tenant: str) -> str:
    spec = KeyIn(scopes=[Scope.EVENTS_WRITE], application="vm", tenants=[tenant])
    return services.registry.create_key(spec).key


@pytest.mark.limits(rate_key_requests_per_second=1, rate_key_requests_burst=3)
def test_key_requests_over_the_limit_get_429_with_the_fields(
    client: TestClient, world: World, clock: Clock
) -> None:
    answers = [client.get("/v1/events", headers=auth(world.reader)) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [fields(a) for a in answers] == [(3, 2, 1), (3, 1, 2), (3, 0, 3)]

    refused = client.get("/v1/events", headers=auth(world.reader))
    problem = assert_rate_limited(refused, limit=3)
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["ratelimit-remaining"] == "0"
    assert "key's requests" in problem["detail"]
    assert world.reader not in refused.text

    # Another key has its own budget; the refused one gets one more each second.
    assert client.get("/v1/events", headers=auth(world.acme_reader)).status_code == 200
    clock.advance(1)
    assert client.get("/v1/events", headers=auth(world.reader)).status_code == 200
    assert client.get("/v1/events", headers=auth(world.reader)).status_code == 429


@pytest.mark.limits(rate_key_requests_per_second=1, rate_key_requests_burst=1)
def test_the_key_request_limit_is_checked_before_the_body_is_read(
    client: TestClient, world: World
) -> None:
    assert post_events(client, world.writer, event("first")).status_code == 200
    # Not JSON, and over the size limit: still a 429, because the body was never looked at.
    assert_rate_limited(post_events(client, world.writer, b"{not json"), limit=1)
    oversized = b"x" * (2 * 1024 * 1024)
    chunked = client.post(
        "/v1/events",
        content=(oversized[i : i + 65536] for i in range(0, len(oversized), 65536)),
        headers={**auth(world.writer), "Content-Type": "application/json"},
    )
    assert_rate_limited(chunked, limit=1)
    assert_rate_limited(post_events(client, world.writer, oversized), limit=1)


@pytest.mark.limits(max_batch_events=10, rate_key_events_per_second=1, rate_key_events_burst=10)
def test_key_events_over_the_limit_refuse_the_whole_batch_and_store_nothing(
    client: TestClient, world: World, clock: Clock
) -> None:
    first = post_events(client, world.writer, batch("one", 6))
    assert first.status_code == 200, first.text
    assert first.json()["accepted"] == 6
    assert fields(first) == (10, 4, 6)  # the events limit is the tightest checked

    refused = post_events(client, world.writer, batch("two", 6, tenant="globex"))
    problem = assert_rate_limited(refused, limit=10)
    assert "key's events" in problem["detail"]
    assert refused.headers["ratelimit-remaining"] == "4"
    assert refused.headers["retry-after"] == "2"
    assert len(export_all(client, world.reader)) == 6

    # Retrying the same batch once the budget allows stores it, whole and once.
    clock.advance(2)
    again = post_events(client, world.writer, batch("two", 6, tenant="globex"))
    assert again.status_code == 200, again.text
    assert again.json()["accepted"] == 6
    assert len(export_all(client, world.reader)) == 12


@pytest.mark.limits(
    max_batch_events=10, rate_tenant_events_per_second=1, rate_tenant_events_burst=10
)
def test_tenant_events_over_the_limit_refuse_the_batch_but_not_other_tenants(
    client: TestClient, world: World
) -> None:
    mixed = {"events": [*batch("a", 6)["events"], *batch("g", 2, tenant="globex")["events"]]}
    assert post_events(client, world.writer, mixed).json()["accepted"] == 8

    # Acme has 4 events left: 6 more (with one globex event riding along) are refused whole.
    over = {"events": [*batch("a2", 6)["events"], event("g2", tenant="globex")]}
    problem = assert_rate_limited(post_events(client, world.writer, over), limit=10)
    assert "tenant acme's events" in problem["detail"]
    assert {e["id"] for e in export_all(client, world.reader)} == {
        *(f"a-{n}" for n in range(6)),
        "g-0",
        "g-1",
    }

    # Globex still has 8 events to spend, acme 4, whoever sends them.
    assert post_events(client, world.writer, batch("g3", 8, tenant="globex")).status_code == 200
    assert post_events(client, world.acme_writer, batch("a3", 4)).status_code == 200
    assert post_events(client, world.acme_writer, event("a4")).status_code == 429


@pytest.mark.limits(rate_tenant_requests_per_second=1, rate_tenant_requests_burst=3)
def test_tenant_requests_are_counted_across_keys_and_routes(
    client: TestClient, world: World, services: Services
) -> None:
    # A key restricted to acme speaks for acme; so does a read filtered to acme.
    assert client.get("/v1/events", headers=auth(world.acme_reader)).status_code == 200
    assert client.get("/v1/events?tenant=acme", headers=auth(world.reader)).status_code == 200
    # An ingest speaks for every tenant its events name (once per request).
    assert post_events(client, world.writer, batch("a", 3)).status_code == 200

    problem = assert_rate_limited(
        client.get("/v1/events", headers=auth(world.acme_reader)), limit=3
    )
    assert "tenant acme's requests" in problem["detail"]
    assert_rate_limited(post_events(client, world.writer, event("a-late")), limit=3)
    assert_rate_limited(post_events(client, world.acme_writer, event("a-late")), limit=3)

    # Globex, and reads not made for one tenant, are untouched.
    globex_writer = writer_for(services, "globex")
    assert post_events(client, globex_writer, event("g", tenant="globex")).status_code == 200
    assert client.get("/v1/events?tenant=globex", headers=auth(world.reader)).status_code == 200
    assert client.get("/v1/events", headers=auth(world.reader)).status_code == 200
    assert "a-late" not in {e["id"] for e in export_all(client, world.reader)}


@pytest.mark.limits(rate_tenant_requests_per_second=1, rate_tenant_requests_burst=3)
def test_a_key_cannot_spend_a_tenant_it_may_not_serve(client: TestClient, world: World) -> None:
    for n in range(10):
        # acme_writer naming globex: refused per event (403), globex is not charged.
        post_events(client, world.acme_writer, event(f"g-{n}", tenant="globex"))
        client.get("/v1/events?tenant=globex", headers=auth(world.acme_reader))
    assert client.get("/v1/events?tenant=globex", headers=auth(world.reader)).status_code == 200


@pytest.mark.limits(rate_tenant_requests_per_second=1, rate_tenant_requests_burst=5)
def test_a_flooding_tenant_does_not_hold_back_another(
    client: TestClient, world: World, services: Services, clock: Clock
) -> None:
    globex_writer = writer_for(services, "globex")
    flood_statuses: list[int] = []
    for second in range(20):
        flood_statuses += [
            post_events(client, world.acme_writer, event(f"a-{second}-{n}")).status_code
            for n in range(10)
        ]
        other = post_events(client, globex_writer, event(f"g-{second}", tenant="globex"))
        assert other.status_code == 200, other.text
        assert other.json()["status"] == "accepted"
        clock.advance(1)
    assert flood_statuses.count(429) >= 150
    assert set(flood_statuses) == {200, 429}


@pytest.mark.limits(**OFF)
def test_a_rate_of_zero_turns_the_limit_off(client: TestClient, world: World) -> None:
    for _ in range(30):
        answer = client.get("/v1/events", headers=auth(world.reader))
        assert answer.status_code == 200
        assert "ratelimit-limit" not in answer.headers


def test_unauthenticated_requests_carry_no_fields(client: TestClient) -> None:
    answer = client.get("/v1/events")
    assert answer.status_code == 401
    assert "ratelimit-limit" not in answer.headers


def test_the_openapi_document_names_the_429_of_every_authenticated_route(
    client: TestClient,
) -> None:
    document = client.get("/openapi.json").json()
    checked = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1/"):
                checked += 1
                answer = operation["responses"].get("429")
                assert answer is not None, f"{method} {path}"
                assert set(answer["headers"]) == {
                    "Retry-After",
                    "RateLimit-Limit",
                    "RateLimit-Remaining",
                    "RateLimit-Reset",
                }
    assert checked >= 5
