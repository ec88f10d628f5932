"""Registration and key lifecycle: /v1/tenants, /v1/applications, /v1/keys (admin scope)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from tally.bootstrap import Services
from tests.api.helpers import assert_problem, at, auth, pointers, post_events
from tests.conftest import World, event


def test_tenant_is_created_with_defaults_and_listed(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    response = client.post("/v1/tenants", json={"id": "initech", "name": "Initech"}, headers=admin)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["id"], body["name"], body["region"], body["lateness_hours"]) == (
        "initech",
        "Initech",
        "eu-west",
        72,
    )
    listed = client.get("/v1/tenants", headers=admin).json()
    assert sorted(t["id"] for t in listed) == ["acme", "globex", "initech"]


def test_creating_a_tenant_twice_is_a_409(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    assert client.post("/v1/tenants", json={"id": "initech"}, headers=admin).status_code == 201
    again = client.post("/v1/tenants", json={"id": "initech", "name": "X"}, headers=admin)
    problem = assert_problem(again, 409, "ERR-VAL-409")
    assert problem["type"] == "/problems/conflict"
    assert_problem(
        client.post("/v1/tenants", json={"id": "acme"}, headers=admin), 409, "ERR-VAL-409"
    )


def test_new_tenant_can_be_reported_for_with_its_lateness_window(
    client: TestClient, world: World
) -> None:
    admin = auth(world.admin)
    spec = {"id": "initech", "lateness_hours": 1}
    assert client.post("/v1/tenants", json=spec, headers=admin).status_code == 201
    ok = event("i-1", tenant="initech", time=at(timedelta(minutes=-30)))
    late = event("i-2", tenant="initech", time=at(timedelta(minutes=-90)))
    assert post_events(client, world.writer, ok).status_code == 200
    assert pointers(post_events(client, world.writer, late).json()) == ["/time"]


@pytest.mark.parametrize(
    ("spec", "pointer"),
    [
        ({"id": "bad id"}, "/id"),
        ({}, "/id"),
        ({"id": "t1", "lateness_hours": 0}, "/lateness_hours"),
        ({"id": "t1", "lateness_hours": 35 * 24 + 1}, "/lateness_hours"),
        ({"id": "t1", "lateness_hours": "72"}, "/lateness_hours"),
        ({"id": "t1", "colour": "red"}, "/colour"),
    ],
)
def test_invalid_tenant_is_a_400_with_a_pointer(
    client: TestClient, world: World, spec: dict[str, object], pointer: str
) -> None:
    response = client.post("/v1/tenants", json=spec, headers=auth(world.admin))
    assert pointer in pointers(assert_problem(response, 400, "ERR-VAL-400"))


def test_tenant_body_that_is_not_json_is_a_400(client: TestClient, world: World) -> None:
    response = client.post(
        "/v1/tenants",
        content=b"{",
        headers={**auth(world.admin), "Content-Type": "application/json"},
    )
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert "not valid" in problem["detail"] and "JSON" in problem["detail"]  # parse_json's own


def test_application_is_created_listed_and_409_on_repeat(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    created = client.post("/v1/applications", json={"id": "db", "name": "DB"}, headers=admin)
    assert created.status_code == 201
    assert (created.json()["id"], created.json()["name"]) == ("db", "DB")
    again = client.post("/v1/applications", json={"id": "db"}, headers=admin)
    assert_problem(again, 409, "ERR-VAL-409")
    listed = client.get("/v1/applications", headers=admin).json()
    assert sorted(a["id"] for a in listed) == ["db", "vm"]


def test_key_is_shown_once_and_never_listed(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    spec = {"scopes": ["events:write"], "application": "vm", "tenants": ["acme"]}
    response = client.post("/v1/keys", json=spec, headers=admin)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"].startswith("key_")
    assert created["key"].startswith("tly_")
    assert (created["scopes"], created["application"], created["tenants"]) == (
        ["events:write"],
        "vm",
        ["acme"],
    )
    assert created["revoked_at"] is None
    listing = client.get("/v1/keys", headers=admin)
    assert listing.status_code == 200
    assert created["key"] not in listing.text
    for secret in (world.admin, world.writer, world.reader):
        assert secret not in listing.text
    assert all("key" not in item for item in listing.json())
    assert "tly_" not in listing.text
    listed = {item["id"]: item for item in listing.json()}
    assert listed[created["id"]]["tenants"] == ["acme"]
    assert len(listed) == 6  # the world's five and this one


def test_new_key_works_with_its_scopes(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    spec = {"scopes": ["events:read", "usage:read"], "expires_at": at(timedelta(days=1))}
    created = client.post("/v1/keys", json=spec, headers=admin).json()
    assert created["expires_at"] is not None
    assert client.get("/v1/events", headers=auth(created["key"])).status_code == 200


def test_revoked_key_is_marked_in_the_listing(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    created = client.post("/v1/keys", json={"scopes": ["events:read"]}, headers=admin).json()
    assert client.delete(f"/v1/keys/{created['id']}", headers=admin).status_code == 204
    listed = {k["id"]: k for k in client.get("/v1/keys", headers=admin).json()}
    assert listed[created["id"]]["revoked_at"] is not None
    assert_problem(client.get("/v1/events", headers=auth(created["key"])), 401, "ERR-AUTH-401")


def test_revoking_an_unknown_key_is_a_404(client: TestClient, world: World) -> None:
    response = client.delete("/v1/keys/key_0000000000000000", headers=auth(world.admin))
    assert_problem(response, 404, "ERR-RES-404")


@pytest.mark.parametrize(
    ("spec", "pointer"),
    [
        ({"scopes": ["events:write"]}, "/application"),
        ({"scopes": ["events:write"], "application": "nope"}, "/application"),
        ({"scopes": ["events:read"], "application": "vm"}, "/application"),
        ({"scopes": ["events:read"], "tenants": ["initech"]}, "/tenants/0"),
        ({"scopes": ["events:read"], "tenants": ["acme", "initech"]}, "/tenants/1"),
        ({"scopes": ["admin", "events:read"]}, "/scopes"),
        ({"scopes": ["admin"], "tenants": ["acme"]}, "/tenants"),
        ({"scopes": []}, "/scopes"),
        ({"scopes": ["root"]}, "/scopes/0"),
        ({"scopes": ["events:read"], "expires_at": "2020-01-01T00:00:00Z"}, "/expires_at"),
        ({"scopes": ["events:read"], "expires_at": "2099-01-01T00:00:00"}, "/expires_at"),
        ({"scopes": ["events:read"], "secret": "mine"}, "/secret"),
    ],
)
def test_invalid_key_request_is_a_400_with_a_pointer(
    client: TestClient, world: World, spec: dict[str, object], pointer: str
) -> None:
    admin = auth(world.admin)
    before = len(client.get("/v1/keys", headers=admin).json())
    response = client.post("/v1/keys", json=spec, headers=admin)
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert pointer in pointers(problem), problem
    assert len(client.get("/v1/keys", headers=admin).json()) == before


def test_deeply_nested_admin_body_is_a_400_not_a_500(client: TestClient, world: World) -> None:
    response = client.post(
        "/v1/tenants",
        content=b"[" * 100_000,
        headers={**auth(world.admin), "Content-Type": "application/json"},
    )
    assert_problem(response, 400, "ERR-VAL-400")


# --- admin bodies: authenticated first, then application/json only ---------------------------

ADMIN_BODIES = [
    ("POST", "/v1/tenants", "TenantIn"),
    ("PATCH", "/v1/tenants/acme", "TenantPatch"),
    ("POST", "/v1/applications", "ApplicationIn"),
    ("POST", "/v1/keys", "KeyIn"),
    ("POST", "/v1/keys/key_0000000000000000/rotate", "RotateIn"),
]


@pytest.mark.parametrize(("method", "path", "model"), ADMIN_BODIES)
def test_an_admin_body_is_not_judged_before_the_caller_is(
    client: TestClient, world: World, method: str, path: str, model: str
) -> None:
    for body in (b"{", b'{"id": 1}', b"[]"):
        headers = {"Content-Type": "application/json"}
        nobody = client.request(method, path, content=body, headers=headers)
        assert_problem(nobody, 401, "ERR-AUTH-401")
        writer = client.request(
            method, path, content=body, headers={**headers, **auth(world.writer)}
        )
        assert_problem(writer, 403, "ERR-AUTH-403")
        wrong_type = client.request(
            method, path, content=body, headers={"Content-Type": "text/plain"}
        )
        assert_problem(wrong_type, 401, "ERR-AUTH-401")


@pytest.mark.parametrize(("method", "path", "model"), ADMIN_BODIES)
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/cloudevents+json",
        "application/json; charset=utf-16",
        "application/json; version=1; charset=latin-1",
        "application/jsonx",
    ],
)
def test_an_admin_body_of_another_type_is_a_415(
    *,
    client: TestClient,
    world: World,
    method: str,
    path: str,
    model: str,
    content_type: str | None,
) -> None:
    headers = auth(world.admin)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = client.request(method, path, content=b'{"id": "initech"}', headers=headers)
    assert_problem(response, 415, "ERR-VAL-400")
    assert client.get("/v1/tenants/initech", headers=auth(world.admin)).status_code == 404


def test_an_admin_body_in_json_with_its_charset_is_read(client: TestClient, world: World) -> None:
    headers = {**auth(world.admin), "Content-Type": 'Application/JSON; v=1; charset="UTF-8"'}
    response = client.post("/v1/tenants", content=b'{"id": "initech"}', headers=headers)
    assert response.status_code == 201, response.text


def test_openapi_describes_each_admin_body_exactly(client: TestClient) -> None:
    from tally.api.admin import BODY_MODELS  # noqa: PLC0415 - the models the routes read

    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    by_name = {model.__name__: model for model in BODY_MODELS}
    for method, path, name in ADMIN_BODIES:
        template = path.replace("/acme", "/{tenant_id}").replace(
            "/key_0000000000000000/", "/{key_id}/"
        )
        body = document["paths"][template][method.lower()]["requestBody"]
        assert body == {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
        expected = by_name[name].model_json_schema(ref_template="#/components/schemas/{model}")
        expected.pop("$defs", None)
        assert schemas[name] == expected
    assert schemas["Scope"]["enum"] == ["admin", "events:write", "events:read", "usage:read"]


# --- tenants can be changed ------------------------------------------------------------------


def test_a_tenant_is_read_and_patched_by_merge(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    assert client.get("/v1/tenants/globex", headers=admin).json()["lateness_hours"] == 24
    assert_problem(client.get("/v1/tenants/initech", headers=admin), 404, "ERR-RES-404")

    renamed = client.patch("/v1/tenants/globex", json={"name": "Globex Corp."}, headers=admin)
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["name"], renamed.json()["lateness_hours"]) == ("Globex Corp.", 24)
    narrowed = client.patch("/v1/tenants/globex", json={"lateness_hours": 12}, headers=admin)
    assert (narrowed.json()["name"], narrowed.json()["lateness_hours"]) == ("Globex Corp.", 12)
    cleared = client.patch("/v1/tenants/globex", json={"name": None}, headers=admin).json()
    assert (cleared["name"], cleared["lateness_hours"]) == (None, 12)
    assert client.get("/v1/tenants/globex", headers=admin).json() == cleared
    unchanged = client.patch("/v1/tenants/globex", json={}, headers=admin)
    assert unchanged.json() == cleared

    updates = client.get("/v1/audit", params={"action": "tenant.update"}, headers=admin).json()
    assert [(e["target"], e["details"]) for e in updates["entries"]] == [
        ("globex", {"old_lateness_hours": 12, "new_lateness_hours": 12, "name_changed": True}),
        ("globex", {"old_lateness_hours": 24, "new_lateness_hours": 12, "name_changed": False}),
        ("globex", {"old_lateness_hours": 24, "new_lateness_hours": 24, "name_changed": True}),
    ]
    assert "Globex" not in str(updates)  # the name is free text: not in the log


@pytest.mark.parametrize(
    ("patch", "pointer"),
    [
        ({"lateness_hours": None}, "/lateness_hours"),
        ({"lateness_hours": 0}, "/lateness_hours"),
        ({"lateness_hours": 35 * 24 + 1}, "/lateness_hours"),
        ({"lateness_hours": "24"}, "/lateness_hours"),
        ({"lateness_hours": 24.0}, "/lateness_hours"),
        ({"name": ""}, "/name"),
        ({"id": "other"}, "/id"),
        ({"region": "us-east"}, "/region"),
    ],
)
def test_an_invalid_tenant_patch_is_a_400_and_changes_nothing(
    client: TestClient, world: World, patch: dict[str, object], pointer: str
) -> None:
    admin = auth(world.admin)
    before = client.get("/v1/tenants/globex", headers=admin).json()
    response = client.patch("/v1/tenants/globex", json=patch, headers=admin)
    assert pointer in pointers(assert_problem(response, 400, "ERR-VAL-400"))
    assert client.get("/v1/tenants/globex", headers=admin).json() == before


def test_a_longer_window_is_refused_as_it_would_reopen_final_periods(
    client: TestClient, world: World
) -> None:
    admin = auth(world.admin)
    before = client.get("/v1/tenants/globex", headers=admin).json()
    response = client.patch(
        "/v1/tenants/globex", json={"name": "G", "lateness_hours": 25}, headers=admin
    )
    problem = assert_problem(response, 409, "ERR-VAL-409")
    assert problem["type"] == "/problems/period-final"
    assert pointers(problem) == ["/lateness_hours"]
    assert client.get("/v1/tenants/globex", headers=admin).json() == before  # name kept too
    updates = client.get("/v1/audit", params={"action": "tenant.update"}, headers=admin).json()
    assert updates["entries"] == []


def test_patching_an_unknown_tenant_is_a_404(client: TestClient, world: World) -> None:
    response = client.patch("/v1/tenants/initech", json={"name": "X"}, headers=auth(world.admin))
    assert_problem(response, 404, "ERR-RES-404")


def test_a_shorter_window_applies_to_new_events_only(client: TestClient, world: World) -> None:
    admin = auth(world.admin)
    kept = event("w-1", time=at(timedelta(hours=-30)))
    assert post_events(client, world.writer, kept).json()["status"] == "accepted"
    narrowed = client.patch("/v1/tenants/acme", json={"lateness_hours": 24}, headers=admin)
    assert narrowed.status_code == 200, narrowed.text

    late = event("w-2", time=at(timedelta(hours=-30)))
    assert pointers(post_events(client, world.writer, late).json()) == ["/time"]
    stored = client.get("/v1/events/vm/w-1", headers=auth(world.reader))
    assert stored.status_code == 200, stored.text


def test_shredded_tenants_are_listed_as_such(
    client: TestClient, world: World, services: Services
) -> None:
    services.registry.shred_tenant("acme")
    admin = auth(world.admin)
    listed = {t["id"]: t["shredded"] for t in client.get("/v1/tenants", headers=admin).json()}
    assert listed == {"acme": True, "globex": False}
    assert client.get("/v1/tenants/acme", headers=admin).json()["shredded"] is True
    assert client.get("/v1/tenants/globex", headers=admin).json()["shredded"] is False
