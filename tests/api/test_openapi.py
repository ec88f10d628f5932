"""The OpenAPI document is exact: what clients are generated from is what the server does.

Each test walks every operation of /openapi.json, so a route added later is held to the
same rules as soon as it is in the document.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.api.app import create_app
from tally.auth.service import Scope
from tally.bootstrap import Services
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.settings import Settings
from tests.api.helpers import auth, post_events
from tests.conftest import World, event

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
CAMEL_CASE = re.compile(r"[a-z]+(?:[A-Z][a-z0-9]*)*")
# The ids billing teams' generated clients already call: renaming one breaks them.
STABLE_IDS = {
    ("post", "/v1/events"): "postEvents",
    ("get", "/v1/events"): "listEvents",
    ("get", "/v1/events/{application}/{event_id}"): "getEvent",
    ("post", "/v1/tenants"): "createTenant",
    ("get", "/v1/tenants"): "listTenants",
    ("post", "/v1/applications"): "createApplication",
    ("get", "/v1/applications"): "listApplications",
    ("post", "/v1/keys"): "createKey",
    ("get", "/v1/keys"): "listKeys",
    ("post", "/v1/keys/{key_id}/rotate"): "rotateKey",
    ("delete", "/v1/keys/{key_id}"): "revokeKey",
    ("get", "/v1/audit"): "listAudit",
    ("get", "/healthz"): "healthz",
    ("get", "/readyz"): "readyz",
}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # Building the app opens nothing: the store opens at start-up, which this never does.
    unused = tmp_path_factory.mktemp("openapi") / "unused.db"
    with TestClient(create_app(Settings(database_url=f"sqlite:///{unused}"))) as client:
        found: dict[str, Any] = client.get("/openapi.json").json()
    return found


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def validate(document: dict[str, Any], instance: object, schema: dict[str, Any]) -> None:
    """`instance` is valid against `schema`, whose $refs point into the document."""
    schema = {**schema, "components": document["components"]}
    jsonschema_rs.Draft202012Validator(schema, validate_formats=True).validate(instance)


def test_every_operation_has_a_short_unique_camel_case_id(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(document)]

    assert [i for i in ids if not CAMEL_CASE.fullmatch(i)] == []
    assert len(ids) == len(set(ids))
    assert all(len(i) <= 32 for i in ids)


def test_the_operation_ids_clients_call_do_not_change(document: dict[str, Any]) -> None:
    found = {(method, path): op["operationId"] for method, path, op in operations(document)}

    assert {route: found.get(route) for route in STABLE_IDS} == STABLE_IDS


def test_every_problem_is_described_as_problem_json_with_the_problem_schema(
    document: dict[str, Any],
) -> None:
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert response["content"] == PROBLEM, (method, path, status)
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "code", "request_id"}


def test_every_operation_lists_every_status_its_kind_can_give(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        listed = set(operation["responses"])
        expected = {"408", "431", "500", "503"}
        if operation.get("security"):
            expected |= {"400", "401", "403", "429"}
        if "requestBody" in operation:
            expected |= {"400", "408", "413", "415"}
        if any(p["in"] == "path" for p in operation.get("parameters", [])):
            expected |= {"400", "404"}
        assert expected <= listed, (method, path, sorted(expected - listed))
        assert "422" not in listed, (method, path)
        # A 405 is what an unlisted method gets, never a listed operation's answer.
        assert "405" not in listed, (method, path)
    assert "409" in document["paths"]["/v1/events"]["post"]["responses"]
    assert "409" in document["paths"]["/v1/tenants"]["post"]["responses"]


def test_problem_statuses_document_their_headers(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        responses = operation["responses"]
        if "401" in responses:
            assert "WWW-Authenticate" in responses["401"]["headers"], (method, path)
        assert "Retry-After" in responses["503"]["headers"], (method, path)


def test_fields_the_server_leaves_out_are_never_null(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name, field in [
        ("Problem", "errors"),
        ("ProblemError", "pointer"),
        ("ProblemError", "parameter"),
        ("EventOutcome", "errors"),
    ]:
        described = schemas[name]["properties"][field]
        assert "anyOf" not in described, (name, field)
        assert "default" not in described, (name, field)


def test_optional_query_parameters_are_never_null(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        for parameter in operation.get("parameters", []):
            assert "anyOf" not in parameter["schema"], (method, path, parameter["name"])
            assert parameter["schema"].get("type") != "null", (method, path)


def test_a_single_event_and_a_batch_answer_as_the_document_says(
    client: TestClient, world: World
) -> None:
    document = client.get("/openapi.json").json()
    schema = document["paths"]["/v1/events"]["post"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]
    single = post_events(client, world.writer, event("evt-doc-1"))
    batch = post_events(client, world.writer, {"events": [event("evt-doc-1"), event("evt-2")]})

    assert single.status_code == batch.status_code == 200
    validate(document, single.json(), schema)
    validate(document, batch.json(), schema)
    assert set(single.json()) == {"id", "status"}
    assert {"$ref": "#/components/schemas/SingleOut"} in schema["oneOf"]


def test_a_problem_is_sent_as_the_document_describes_it(client: TestClient, world: World) -> None:
    document = client.get("/openapi.json").json()
    first = event("evt-doc-conflict", quantity="1")
    assert post_events(client, world.writer, first).status_code == 200

    answers = {
        "401": client.get("/v1/events"),
        "409": post_events(client, world.writer, {**first, "quantity": "2"}),
        "400": client.get("/v1/events?limit=0", headers=auth(world.reader)),
    }

    for status, answer in answers.items():
        assert str(answer.status_code) == status
        assert answer.headers["content-type"] == "application/problem+json"
        validate(document, answer.json(), {"$ref": "#/components/schemas/Problem"})


# Values a parameter's schema refuses, tried on every parameter: each one the schema really
# refuses must be refused by the server, with an error naming that parameter.
REFUSED_PROBES = [
    "",
    " ",
    "a b",
    "-lead",
    "UPPER",
    "x" * 300,
    "é",
    "tab\there",
    "nul\x00",
    "del\x7f",
    "yesterday",
    "2026-01-01T00:00:00",
    "2026-01-01 00:00:00Z",
]


def _probe_url(path: str, parameter: dict[str, Any], value: str) -> str:
    if parameter["in"] == "query":
        return f"{re.sub(r'{[^}]+}', 'x', path)}?{parameter['name']}={quote(value, safe='')}"
    url = path.replace("{" + parameter["name"] + "}", quote(value, safe=""))
    return re.sub(r"{[^}]+}", "x", url)


def _named(answer: Any, name: str) -> bool:
    if answer.status_code != 400:
        return False
    return any(e.get("parameter") == name for e in answer.json().get("errors", []))


def _schema_accepts(document: dict[str, Any], schema: dict[str, Any], value: str) -> bool:
    checker = jsonschema_rs.Draft202012Validator(
        {**schema, "components": document["components"]}, validate_formats=True
    )
    if schema.get("type") == "integer":
        return value.isdigit() and checker.is_valid(int(value))
    return checker.is_valid(value)


def _probed(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for method, path, operation in operations(document):
        if method == "get":  # probing a GET changes nothing
            for parameter in operation.get("parameters", []):
                yield method, path, parameter


@pytest.fixture
def every_scope(services: Services) -> list[dict[str, str]]:
    """Headers of two keys that hold every scope between them (an admin key holds no other),
    so that each probe reaches the parameter's check."""
    registry = services.registry
    registry.create_tenant(TenantIn(id="acme"))
    registry.create_application(ApplicationIn(id="vm"))
    others = KeyIn(scopes=[s for s in Scope if s is not Scope.ADMIN], application="vm")
    return [auth(registry.create_key(spec).key) for spec in (others, KeyIn(scopes=[Scope.ADMIN]))]


def probe(client: TestClient, url: str, keys: list[dict[str, str]]) -> Any:
    answer = client.get(url, headers=keys[0])
    return client.get(url, headers=keys[1]) if answer.status_code == 403 else answer


def test_every_value_a_parameter_schema_refuses_the_server_refuses(
    client: TestClient, every_scope: list[dict[str, str]]
) -> None:
    document = client.get("/openapi.json").json()
    checked = 0
    for _, path, parameter in _probed(document):
        for value in [*REFUSED_PROBES, "0", "10001", "-1"]:
            if parameter["in"] == "path" and value in ("", " "):
                continue  # an empty segment is another path, not a bad value
            if _schema_accepts(document, parameter["schema"], value):
                continue
            answer = probe(client, _probe_url(path, parameter, value), every_scope)
            assert _named(answer, parameter["name"]), (path, parameter["name"], value, answer.text)
            checked += 1
    assert checked > 50


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_value_a_parameter_pattern_accepts_the_server_accepts(
    client: TestClient, every_scope: list[dict[str, str]], data: st.DataObject
) -> None:
    document = client.get("/openapi.json").json()
    patterned = [
        (path, parameter)
        for _, path, parameter in _probed(document)
        if "pattern" in parameter["schema"] and parameter["schema"].get("format") != "date-time"
    ]
    assert len(patterned) >= 5
    path, parameter = data.draw(st.sampled_from(patterned))
    # The whole schema, not the pattern alone: a pattern may leave lengths to minLength.
    value = data.draw(
        st.from_regex(parameter["schema"]["pattern"], fullmatch=True).filter(
            lambda drawn: _schema_accepts(document, parameter["schema"], drawn)
        )
    )
    if parameter["in"] == "path" and re.search(r"(^|/)\.{1,2}(/|$)", value):
        return  # a dot segment is resolved away by the client before it is sent

    answer = probe(client, _probe_url(path, parameter, value), every_scope)

    assert not _named(answer, parameter["name"]), (path, parameter["name"], value, answer.text)


def test_every_component_schema_has_a_plain_name(client: TestClient) -> None:
    # Two models of one name get module-qualified names (tally__api__…), which generators
    # refuse as duplicates: the generated client then silently lacks whatever refers to them.
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert [name for name in schemas if "__" in name] == []
