"""Health, readiness, the OpenAPI document and the shape of every problem document."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import (
    CLOUDEVENT,
    CLOUDEVENT_BATCH,
    JSON,
    PROBLEM_FIELDS,
    assert_problem,
    auth,
)
from tests.conftest import World

AUTHENTICATED: list[tuple[str, str]] = [
    ("post", "/v1/events"),
    ("get", "/v1/events"),
    ("get", "/v1/events/{application}/{event_id}"),
    ("post", "/v1/tenants"),
    ("get", "/v1/tenants"),
    ("post", "/v1/applications"),
    ("get", "/v1/applications"),
    ("post", "/v1/keys"),
    ("get", "/v1/keys"),
    ("delete", "/v1/keys/{key_id}"),
]


def test_healthz_answers_ok_without_a_key(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"]


def test_readyz_answers_ready_when_the_store_answers(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"store": "ok", "keyring": "ok", "redis": "not_configured"},
    }


@pytest.fixture
def openapi(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def test_openapi_describes_every_route(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    for method, path in [*AUTHENTICATED, ("get", "/healthz"), ("get", "/readyz")]:
        assert path in paths, path
        assert method in paths[path], (method, path)


def test_openapi_ingest_body_lists_the_three_media_types(openapi: dict[str, Any]) -> None:
    body = openapi["paths"]["/v1/events"]["post"]["requestBody"]
    assert set(body["content"]) == {JSON, CLOUDEVENT, CLOUDEVENT_BATCH}
    schemas = openapi["components"]["schemas"]
    for name in ("EventIn", "BatchIn", "CloudEventIn"):
        assert name in schemas


def test_openapi_has_no_422_responses(openapi: dict[str, Any]) -> None:
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation.get("responses", {}), (method, path)
    assert "HTTPValidationError" not in openapi["components"]["schemas"]


def test_openapi_documents_400_401_403_on_authenticated_routes(openapi: dict[str, Any]) -> None:
    for method, path in AUTHENTICATED:
        documented = openapi["paths"][path][method]["responses"]
        for status in ("400", "401", "403"):
            assert status in documented, (method, path, status)
            assert "application/problem+json" in documented[status]["content"]


def test_openapi_documents_ingest_specific_errors(openapi: dict[str, Any]) -> None:
    documented = openapi["paths"]["/v1/events"]["post"]["responses"]
    assert {"409", "413", "415"} <= set(documented)
    assert "404" in openapi["paths"]["/v1/events/{application}/{event_id}"]["get"]["responses"]


def test_openapi_declares_bearer_authentication(openapi: dict[str, Any]) -> None:
    schemes = openapi["components"]["securitySchemes"]
    assert any(s.get("scheme", "").lower() == "bearer" for s in schemes.values())


# --- problem documents ----------------------------------------------------------------------


def test_problem_document_carries_every_field_and_the_request_id(
    client: TestClient, world: World
) -> None:
    response = client.get("/v1/events", params={"limit": 0}, headers=auth(world.reader))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert set(problem) >= PROBLEM_FIELDS
    assert all(isinstance(problem[f], str) for f in PROBLEM_FIELDS - {"status"})
    assert problem["title"]
    assert problem["detail"]
    assert problem["request_id"] == response.headers["x-request-id"]


def test_offered_request_id_is_echoed(client: TestClient, world: World) -> None:
    headers = {**auth(world.reader), "X-Request-ID": "trace-123.abc"}
    response = client.get("/v1/events/vm/nope", headers=headers)
    problem = assert_problem(response, 404, "ERR-RES-404")
    assert problem["request_id"] == "trace-123.abc"
    assert response.headers["x-request-id"] == "trace-123.abc"


def test_unsafe_request_id_is_replaced(client: TestClient, world: World) -> None:
    headers = {**auth(world.reader), "X-Request-ID": "a b<script>"}
    response = client.get("/v1/events/vm/nope", headers=headers)
    assert response.headers["x-request-id"] != "a b<script>"
    assert "<script>" not in response.text


def test_successful_responses_carry_a_request_id(client: TestClient, world: World) -> None:
    response = client.get("/v1/events", headers=auth(world.reader))
    assert response.status_code == 200
    assert response.headers["x-request-id"]


def test_unknown_route_is_a_404_problem(client: TestClient) -> None:
    assert_problem(client.get("/v1/nothing"), 404, "ERR-RES-404")


def test_wrong_method_is_a_405_problem(client: TestClient, world: World) -> None:
    response = client.put("/v1/events", headers=auth(world.writer))
    assert response.status_code == 405
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/events", "GET, POST"),
        ("OPTIONS", "/v1/keys", "GET, POST"),
        ("PATCH", "/v1/keys/key_1", "DELETE"),
        ("DELETE", "/v1/events/vm/a/b", "GET"),
    ],
)
def test_405_names_every_method_the_path_allows(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path)

    assert response.status_code == 405
    assert response.headers["allow"] == allowed
