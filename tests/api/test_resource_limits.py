"""Resource limits seen in-process: each is a setting with a safe default and refused bounds,
and the event-level ones (body, batch, attributes, page size) hold through the API.

The limits that are about the server process (headers, timeouts, connections) are proved
against a real `tally serve` in tests/e2e/test_resource_limits.py.
"""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tally.events.validation import MAX_ATTRIBUTE_KEY, MAX_ATTRIBUTE_STRING, MAX_ATTRIBUTES
from tally.settings import Settings
from tests.api.helpers import assert_problem, auth, post_events
from tests.conftest import World, event

DEFAULTS = {
    "max_body_bytes": 1024 * 1024,
    "max_batch_events": 1000,
    "max_header_bytes": 16 * 1024,
    "request_timeout_seconds": 30,
    "keepalive_timeout_seconds": 5,
    "max_connections": 1000,
}


def test_every_limit_has_a_safe_default() -> None:
    settings = Settings(database_url="sqlite:///unused.db")
    assert {name: getattr(settings, name) for name in DEFAULTS} == DEFAULTS


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_body_bytes", 0),
        ("max_body_bytes", 1024 * 1024 * 1024),
        ("max_batch_events", 0),
        ("max_batch_events", 1_000_000),
        ("max_header_bytes", 100),
        ("max_header_bytes", 64 * 1024 * 1024),
        ("request_timeout_seconds", 0),
        ("request_timeout_seconds", 86_400),
        ("keepalive_timeout_seconds", 0),
        ("keepalive_timeout_seconds", 86_400),
        ("max_connections", 0),
        ("max_connections", 10_000_000),
    ],
)
def test_a_limit_out_of_its_bounds_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: int
) -> None:
    monkeypatch.setenv(f"TALLY_{name.upper()}", str(value))
    with pytest.raises(ValidationError) as refused:
        Settings(database_url="sqlite:///unused.db")
    assert [error["loc"] for error in refused.value.errors()] == [(name,)]


@pytest.mark.parametrize(
    ("attributes", "pointer"),
    [
        ({f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)}, "/attributes"),
        ({"k" * (MAX_ATTRIBUTE_KEY + 1): "v"}, "/attributes/" + "k" * (MAX_ATTRIBUTE_KEY + 1)),
        ({"sku": "x" * (MAX_ATTRIBUTE_STRING + 1)}, "/attributes/sku"),
    ],
    ids=["count", "name-length", "value-length"],
)
def test_attribute_bounds_hold_through_the_api(
    client: TestClient, world: World, attributes: dict[str, str], pointer: str
) -> None:
    response = post_events(client, world.writer, event("e-1", attributes=attributes))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert [e["pointer"] for e in problem["errors"]] == [pointer]


def test_attributes_at_their_bounds_are_accepted(client: TestClient, world: World) -> None:
    attributes = {f"k{i}": "x" * MAX_ATTRIBUTE_STRING for i in range(MAX_ATTRIBUTES)}
    response = post_events(client, world.writer, event("e-1", attributes=attributes))
    assert response.json()["status"] == "accepted"


def test_export_page_size_is_bounded(client: TestClient, world: World) -> None:
    response = client.get("/v1/events", params={"limit": 10_001}, headers=auth(world.reader))
    assert_problem(response, 400, "ERR-VAL-400")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/tenants", "/v1/keys", "/v1/applications"])
def test_admin_bodies_are_bounded_and_never_read_for_an_anonymous_caller(
    client: TestClient, world: World, settings: Settings, path: str, declared: bool
) -> None:
    # An admin route reads its body only once the caller is known to be an admin
    # (api/admin.py), so an anonymous client cannot make the server hold any of it; an
    # admin's body is bounded by the same limit as every other body.
    big = b"a" * (settings.max_body_bytes + 1)

    def chunks() -> object:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    def post(headers: dict[str, str]) -> httpx.Response:
        content = big if declared else chunks()
        json_body = {"Content-Type": "application/json"}
        return client.post(path, content=content, headers=json_body | headers)  # type: ignore[arg-type]

    anonymous = post({})
    # 401 when the body is left unread; a server that refuses a declared oversized length
    # before authenticating (413) holds none of it either.
    assert anonymous.status_code in {401, 413}, anonymous.text
    assert anonymous.headers["content-type"].startswith("application/problem+json")
    problem = assert_problem(post(auth(world.admin)), 413, "ERR-VAL-400")
    assert problem["type"] == "/problems/payload-too-large"
