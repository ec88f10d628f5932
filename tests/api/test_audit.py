"""The audit log over the API: every administrative action is recorded with who, what, when,
from where and the request id; refused admin attempts too; never a secret."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.bootstrap import Services, build
from tally.registry.audit import AuditFilter, AuditRecord
from tally.registry.models import KeyIn
from tally.settings import Settings
from tally.store.interface import EventStore
from tests.api.helpers import assert_problem, auth, parameters
from tests.conftest import World

TESTCLIENT_ADDRESS = "testclient"  # the ASGI client host Starlette's TestClient reports


def admin_key_id(client: TestClient, world: World) -> str:
    """The id of the world's admin key (the only one with the admin scope)."""
    listed = client.get("/v1/keys", headers=auth(world.admin)).json()
    [found] = [k["id"] for k in listed if k["scopes"] == ["admin"]]
    return str(found)


def audit(client: TestClient, world: World, **params: Any) -> dict[str, Any]:
    response = client.get("/v1/audit", params=params, headers=auth(world.admin))
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def entries(client: TestClient, world: World, **params: Any) -> list[dict[str, Any]]:
    """The entries the test made: the world's own set-up is recorded as actor `system`."""
    found = audit(client, world, limit=1000, **params)["entries"]
    return [e for e in found if e["actor"] != "system"]


def admin_call(
    client: TestClient, world: World, method: str, path: str, body: object, *, request_id: str
) -> Any:
    headers = {**auth(world.admin), "X-Request-ID": request_id}
    return client.request(method, path, json=body, headers=headers)


def test_every_admin_action_is_recorded_with_actor_address_and_request_id(
    client: TestClient, world: World
) -> None:
    admin_id = admin_key_id(client, world)
    steps = [
        ("POST", "/v1/tenants", {"id": "initech", "name": "Initech"}, "tenant.create"),
        ("POST", "/v1/applications", {"id": "db"}, "application.create"),
        ("POST", "/v1/keys", {"scopes": ["events:write"], "application": "db"}, "key.create"),
    ]
    responses: dict[str, Any] = {}
    for n, (method, path, body, action) in enumerate(steps):
        response = admin_call(client, world, method, path, body, request_id=f"req-{n}")
        assert response.status_code == 201, response.text
        responses[action] = response.json()
    key_id = responses["key.create"]["id"]
    rotated = admin_call(
        client,
        world,
        "POST",
        f"/v1/keys/{key_id}/rotate",
        {"grace_seconds": 60},
        request_id="req-3",
    )
    assert rotated.status_code == 201
    new_id = rotated.json()["id"]
    revoked = admin_call(client, world, "DELETE", f"/v1/keys/{new_id}", None, request_id="req-4")
    assert revoked.status_code == 204

    found = [e for e in entries(client, world) if e["actor"] == admin_id]
    assert [(e["action"], e["target"], e["request_id"]) for e in found] == [
        ("key.revoke", new_id, "req-4"),
        ("key.rotate", key_id, "req-3"),
        ("key.create", key_id, "req-2"),
        ("application.create", "db", "req-1"),
        ("tenant.create", "initech", "req-0"),
    ]
    assert {e["source"] for e in found} == {TESTCLIENT_ADDRESS}
    for e in found:
        assert abs(datetime.fromisoformat(e["at"]) - datetime.now(UTC)) < timedelta(minutes=5)
    by_action = {e["action"]: e for e in found}
    assert by_action["key.rotate"]["details"]["replaced_by"] == new_id
    assert by_action["key.rotate"]["details"]["grace_seconds"] == 60
    assert by_action["key.create"]["details"]["scopes"] == ["events:write"]
    assert by_action["key.create"]["details"]["application"] == "db"
    assert by_action["tenant.create"]["details"] == {"region": "eu-west", "lateness_hours": 72}


def test_a_generated_request_id_is_the_one_recorded(client: TestClient, world: World) -> None:
    response = client.post("/v1/tenants", json={"id": "initech"}, headers=auth(world.admin))
    [entry] = entries(client, world, action="tenant.create")
    assert entry["request_id"] == response.headers["x-request-id"]


def test_a_failed_action_is_not_recorded(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    assert client.post("/v1/tenants", json={"id": "acme"}, headers=admin).status_code == 409
    assert client.post("/v1/keys", json={"scopes": ["root"]}, headers=admin).status_code == 400
    assert client.delete("/v1/keys/key_0000000000000000", headers=admin).status_code == 404
    assert entries(client, world) == []


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("POST", "/v1/tenants", "/v1/tenants"),
        ("GET", "/v1/keys", "/v1/keys"),
        ("POST", "/v1/keys/key_0000000000000000/rotate", "/v1/keys/{key_id}/rotate"),
        ("GET", "/v1/audit", "/v1/audit"),
    ],
)
def test_refused_admin_attempts_are_recorded_as_access_denied(
    client: TestClient, world: World, method: str, path: str, route: str
) -> None:
    headers = {**auth(world.writer), "X-Request-ID": "denied-1"}
    response = client.request(method, path, json={"id": "x"}, headers=headers)
    assert_problem(response, 403, "ERR-AUTH-403")
    [entry] = entries(client, world, action="access.denied")
    assert entry["target"] == route
    assert entry["details"] == {"method": method, "count": 1}
    assert entry["request_id"] == "denied-1"
    assert entry["source"] == TESTCLIENT_ADDRESS
    assert entry["actor"].startswith("key_")
    assert entry["actor"] != admin_key_id(client, world)


def test_unauthenticated_attempts_are_not_recorded(client: TestClient, world: World) -> None:
    for headers in ({}, auth("tly_" + "A" * 42), {"Authorization": "Bearer nonsense"}):
        assert_problem(client.get("/v1/keys", headers=headers), 401, "ERR-AUTH-401")
    assert entries(client, world) == []


def test_listing_is_newest_first_in_pages_with_a_cursor(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    for n in range(7):
        assert client.post("/v1/tenants", json={"id": f"t{n}"}, headers=admin).status_code == 201
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 3, "actor": admin_key_id(client, world)}
    pages = 0
    while True:
        page = audit(client, world, **params)
        pages += 1
        seen.extend(e["target"] for e in page["entries"])
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        params["cursor"] = page["next_cursor"]
    assert seen == [f"t{n}" for n in reversed(range(7))]
    assert pages == 3


def test_listing_filters_by_action_actor_and_since(
    client: TestClient, world: World, services: Services
) -> None:
    admin = auth(world.admin)
    assert client.post("/v1/tenants", json={"id": "t1"}, headers=admin).status_code == 201
    assert client.get("/v1/keys", headers=auth(world.reader)).status_code == 403
    cut = datetime.now(UTC)
    assert client.post("/v1/applications", json={"id": "a1"}, headers=admin).status_code == 201
    admin_id = admin_key_id(client, world)

    assert [e["target"] for e in entries(client, world, action="tenant.create")] == ["t1"]
    assert [e["action"] for e in entries(client, world, actor=admin_id)] == [
        "application.create",
        "tenant.create",
    ]
    assert [e["target"] for e in entries(client, world, since=cut.isoformat())] == ["a1"]
    assert entries(client, world, action="tenant.shred") == []
    del services


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "-1"}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"action": "Not An Action"}, "action"),
    ],
)
def test_bad_listing_parameters_are_a_400(
    client: TestClient, world: World, params: dict[str, Any], parameter: str
) -> None:
    response = client.get("/v1/audit", params=params, headers=auth(world.admin))
    assert parameter in parameters(assert_problem(response, 400, "ERR-VAL-400"))


def raw_audit_rows(database_url: str) -> str:
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(Path(database_url.removeprefix("sqlite:///"))) as connection:
            rows: list[Any] = connection.execute("SELECT * FROM audit_log").fetchall()
    else:
        with psycopg.connect(database_url) as pg:
            rows = pg.execute("SELECT * FROM audit_log").fetchall()
    return repr(rows)


def test_the_audit_log_never_holds_a_secret(
    client: TestClient, world: World, database_url: str
) -> None:
    admin = auth(world.admin)
    created = client.post("/v1/keys", json={"scopes": ["events:read"]}, headers=admin).json()
    rotated = client.post(
        f"/v1/keys/{created['id']}/rotate", json={"grace_seconds": 5}, headers=admin
    ).json()
    client.get("/v1/keys", headers=auth(world.writer))  # a refusal, recorded
    secrets = [world.admin, world.writer, created["key"], rotated["key"]]

    listing = client.get("/v1/audit", headers=admin).text
    raw = raw_audit_rows(database_url)
    assert len(entries(client, world)) == 3
    for text in (listing, raw):
        assert "tly_" not in text
        for secret in secrets:
            assert secret not in text
            assert hashlib.sha256(secret.encode()).hexdigest() not in text


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def denials(services: Services) -> list[AuditRecord]:
    return services.store.list_audit(AuditFilter(action="access.denied"), limit=1000)


@pytest.fixture
def clocked(settings: Settings, store: EventStore) -> Iterator[tuple[Services, Clock, TestClient]]:
    """Services on a clock the test moves, and an API client over them."""
    clock = Clock()
    services = build(settings, store=store, clock=clock)
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        yield services, clock, client
    services.committer.close()


def test_a_burst_of_refusals_is_a_row_or_two_whose_counts_add_up(
    clocked: tuple[Services, Clock, TestClient],
) -> None:
    services, clock, client = clocked
    reader = services.registry.create_key(KeyIn(scopes=["events:read"]))
    for n in range(500):
        # Made-up ids in the path do not make rows of their own either.
        response = client.delete(f"/v1/keys/key_{n:016x}", headers=auth(reader.key))
        assert response.status_code == 403
    assert [r.details for r in denials(services)] == [{"method": "DELETE", "count": 1}]

    clock.now += timedelta(seconds=61)  # the next row is due: it carries the 499 held
    assert client.delete("/v1/keys/key_x", headers=auth(reader.key)).status_code == 403
    for _ in range(20):
        assert client.get("/v1/keys", headers=auth(reader.key)).status_code == 403
    services.registry.close()  # at shutdown (Services.close), what is still held is written

    rows = denials(services)
    assert len(rows) <= 4
    counts: dict[tuple[str | None, object], int] = {}
    for row in rows:
        assert row.actor == reader.id
        count = row.details["count"]
        assert isinstance(count, int)
        where = (row.target, row.details["method"])
        counts[where] = counts.get(where, 0) + count
    assert counts == {("/v1/keys/{key_id}", "DELETE"): 501, ("/v1/keys", "GET"): 20}


def test_held_refusals_are_written_by_a_later_sweep_without_a_new_one_of_their_own(
    clocked: tuple[Services, Clock, TestClient],
) -> None:
    services, clock, client = clocked
    first = services.registry.create_key(KeyIn(scopes=["events:read"]))
    second = services.registry.create_key(KeyIn(scopes=["events:read"]))
    for _ in range(30):
        assert client.get("/v1/audit", headers=auth(first.key)).status_code == 403
    clock.now += timedelta(minutes=2)
    # Another key's refusal sweeps the first key's held count into the log.
    assert client.get("/v1/audit", headers=auth(second.key)).status_code == 403
    # The sweep's row opened a new window for the first key: its next refusal is held.
    assert client.get("/v1/audit", headers=auth(first.key)).status_code == 403
    found = {(r.actor, r.details["count"]) for r in denials(services)}
    assert found == {(first.id, 1), (first.id, 29), (second.id, 1)}
