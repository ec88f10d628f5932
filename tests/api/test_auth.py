"""Authentication (one 401 for every bad key) and authorisation (scopes, tenants)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tally.auth import keys
from tally.auth.records import KeyRecord
from tally.bootstrap import Services
from tests.api.helpers import assert_problem, auth, export_all, post_events
from tests.conftest import World, event


def without_request_id(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    body.pop("request_id")
    return body


def expired_key(services: Services) -> str:
    """A reader key that expired a second ago (written straight to the store: the API refuses
    to issue keys that are already expired)."""
    secret = keys.new_secret()
    now = datetime.now(UTC)
    services.store.create_key(
        KeyRecord(
            id=keys.new_key_id(),
            secret_hash=keys.secret_hash(secret),
            scopes=("events:read",),
            application=None,
            tenants=None,
            created_at=now - timedelta(days=1),
            expires_at=now - timedelta(seconds=1),
            revoked_at=None,
        )
    )
    return secret


def revoked_key(client: TestClient, world: World) -> str:
    created = client.post("/v1/keys", json={"scopes": ["events:read"]}, headers=auth(world.admin))
    assert created.status_code == 201
    before = client.get("/v1/events", headers=auth(created.json()["key"]))
    assert before.status_code == 200
    gone = client.delete(f"/v1/keys/{created.json()['id']}", headers=auth(world.admin))
    assert gone.status_code == 204
    return str(created.json()["key"])


def test_missing_malformed_unknown_revoked_and_expired_keys_get_the_same_401(
    client: TestClient, world: World, services: Services
) -> None:
    valid = world.reader
    headers: dict[str, dict[str, str]] = {
        "missing": {},
        "empty": {"Authorization": ""},
        "not_bearer": {"Authorization": f"Basic {valid}"},
        "bearer_without_key": {"Authorization": "Bearer"},
        "garbage": {"Authorization": "Bearer not-a-key"},
        "bad_checksum": {"Authorization": f"Bearer {valid[:-1]}{'A' if valid[-1] != 'A' else 'B'}"},
        "unknown": auth(keys.new_secret()),
        "revoked": auth(revoked_key(client, world)),
        "expired": auth(expired_key(services)),
    }
    bodies = {}
    for name, header in headers.items():
        response = client.get("/v1/events", headers=header)
        problem = assert_problem(response, 401, "ERR-AUTH-401")
        assert response.headers["www-authenticate"].lower().startswith("bearer"), name
        assert problem["type"] == "/problems/invalid-credentials"
        assert valid not in response.text
        bodies[name] = without_request_id(response)
    assert len({repr(sorted(b.items())) for b in bodies.values()}) == 1, bodies


def test_key_is_recognised_with_a_lowercase_bearer_scheme(client: TestClient, world: World) -> None:
    response = client.get("/v1/events", headers={"Authorization": f"bearer {world.reader}"})
    assert response.status_code == 200


def test_revoked_key_is_refused_at_once_for_writing_too(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    created = client.post(
        "/v1/keys", json={"scopes": ["events:write"], "application": "vm"}, headers=admin
    ).json()
    assert post_events(client, created["key"], event("e-1")).status_code == 200
    assert client.delete(f"/v1/keys/{created['id']}", headers=admin).status_code == 204
    assert_problem(post_events(client, created["key"], event("e-2")), 401, "ERR-AUTH-401")
    assert [e["id"] for e in export_all(client, world.reader)] == ["e-1"]


def test_unauthenticated_post_is_refused_before_the_body_is_judged(
    client: TestClient, world: World
) -> None:
    response = client.post(
        "/v1/events", content=b"not json", headers={"Content-Type": "text/plain"}
    )
    assert_problem(response, 401, "ERR-AUTH-401")


@pytest.mark.parametrize(
    "path",
    ["/v1/tenants", "/v1/applications", "/v1/keys", "/v1/keys/key_0000000000000000/rotate"],
)
def test_non_admin_key_gets_403_before_its_admin_body_is_judged(
    client: TestClient, world: World, path: str
) -> None:
    response = client.post(path, json={"bogus": True}, headers=auth(world.writer))

    assert_problem(response, 403, "ERR-AUTH-403")


# --- scopes do not imply each other ---------------------------------------------------------

ADMIN_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/tenants", {"id": "initech"}),
    ("GET", "/v1/tenants", None),
    ("POST", "/v1/applications", {"id": "db"}),
    ("GET", "/v1/applications", None),
    ("POST", "/v1/keys", {"scopes": ["events:read"]}),
    ("GET", "/v1/keys", None),
    ("DELETE", "/v1/keys/key_0000000000000000", None),
    ("POST", "/v1/keys/key_0000000000000000/rotate", {"grace_seconds": 60}),
    ("GET", "/v1/audit", None),
]


def call(
    client: TestClient, key: str, method: str, path: str, body: dict[str, Any] | None
) -> httpx.Response:
    response: httpx.Response = client.request(method, path, json=body, headers=auth(key))
    return response


@pytest.mark.parametrize("who", ["writer", "reader", "acme_reader", "acme_writer"])
def test_non_admin_keys_cannot_use_admin_routes(client: TestClient, world: World, who: str) -> None:
    key = getattr(world, who)
    for method, path, body in ADMIN_ROUTES:
        response = call(client, key, method, path, body)
        assert_problem(response, 403, "ERR-AUTH-403")
    tenants = client.get("/v1/tenants", headers=auth(world.admin)).json()
    assert sorted(t["id"] for t in tenants) == ["acme", "globex"]


def test_writer_cannot_read_events(client: TestClient, world: World) -> None:
    assert post_events(client, world.writer, event("e-1")).status_code == 200
    assert_problem(client.get("/v1/events", headers=auth(world.writer)), 403, "ERR-AUTH-403")
    response = client.get("/v1/events/vm/e-1", headers=auth(world.writer))
    assert_problem(response, 403, "ERR-AUTH-403")


def test_reader_cannot_post_events(client: TestClient, world: World) -> None:
    for key in (world.reader, world.acme_reader):
        assert_problem(post_events(client, key, event("e-1")), 403, "ERR-AUTH-403")
    assert export_all(client, world.reader) == []


def test_admin_can_neither_read_nor_write_events(client: TestClient, world: World) -> None:
    assert_problem(client.get("/v1/events", headers=auth(world.admin)), 403, "ERR-AUTH-403")
    assert_problem(client.get("/v1/events/vm/e-1", headers=auth(world.admin)), 403, "ERR-AUTH-403")
    assert_problem(post_events(client, world.admin, event("e-1")), 403, "ERR-AUTH-403")
    assert export_all(client, world.reader) == []


def test_usage_only_key_cannot_read_events(client: TestClient, world: World) -> None:
    created = client.post("/v1/keys", json={"scopes": ["usage:read"]}, headers=auth(world.admin))
    assert created.status_code == 201
    response = client.get("/v1/events", headers=auth(created.json()["key"]))
    assert_problem(response, 403, "ERR-AUTH-403")


def test_forbidden_problem_does_not_reveal_the_key(client: TestClient, world: World) -> None:
    response = client.get("/v1/events", headers=auth(world.writer))
    assert world.writer not in response.text


# --- tenant restrictions --------------------------------------------------------------------


@pytest.fixture
def both_tenants(client: TestClient, world: World) -> None:
    batch = {"events": [event("a-1"), event("g-1", tenant="globex"), event("a-2")]}
    assert post_events(client, world.writer, batch).json()["accepted"] == 3


@pytest.mark.usefixtures("both_tenants")
def test_reader_restricted_to_acme_is_forbidden_to_filter_on_globex(
    client: TestClient, world: World
) -> None:
    response = client.get(
        "/v1/events", params={"tenant": "globex"}, headers=auth(world.acme_reader)
    )
    assert_problem(response, 403, "ERR-AUTH-403")


@pytest.mark.usefixtures("both_tenants")
def test_reader_restricted_to_acme_sees_only_acme_events_without_a_filter(
    client: TestClient, world: World
) -> None:
    seen = export_all(client, world.acme_reader)
    assert sorted(e["id"] for e in seen) == ["a-1", "a-2"]
    assert {e["tenant"] for e in seen} == {"acme"}
    acme = export_all(client, world.acme_reader, tenant="acme")
    assert sorted(e["id"] for e in acme) == ["a-1", "a-2"]
    assert sorted(e["id"] for e in export_all(client, world.reader)) == ["a-1", "a-2", "g-1"]


@pytest.mark.usefixtures("both_tenants")
def test_reader_restricted_to_acme_cannot_get_a_globex_event(
    client: TestClient, world: World
) -> None:
    response = client.get("/v1/events/vm/g-1", headers=auth(world.acme_reader))
    assert_problem(response, 404, "ERR-RES-404")  # as for an id never used: no oracle
    assert client.get("/v1/events/vm/a-1", headers=auth(world.acme_reader)).status_code == 200
    assert client.get("/v1/events/vm/g-1", headers=auth(world.reader)).status_code == 200


def test_unknown_event_is_a_404(client: TestClient, world: World) -> None:
    response = client.get("/v1/events/vm/nope", headers=auth(world.reader))
    problem = assert_problem(response, 404, "ERR-RES-404")
    assert problem["type"] == "/problems/not-found"
    other = client.get("/v1/events/unknown-app/nope", headers=auth(world.reader))
    assert_problem(other, 404, "ERR-RES-404")


def test_event_id_with_a_slash_can_be_fetched(client: TestClient, world: World) -> None:
    assert post_events(client, world.writer, event("run/7:a")).status_code == 200
    got = client.get("/v1/events/vm/run/7:a", headers=auth(world.reader))
    assert got.status_code == 200
    assert got.json()["id"] == "run/7:a"
