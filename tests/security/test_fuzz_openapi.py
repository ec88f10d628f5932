"""schemathesis against the OpenAPI document, with real keys, on an in-process app.

Every operation in /openapi.json gets generated requests (valid and invalid ones, a bounded
number each) sent with a key that may call it, and every answer must be no 5xx and match the
document: a documented status code, its content type, its schema, its headers; invalid
requests must be refused. A new route is fuzzed as soon as it is in the document.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.types import Receive, Scope, Send

from tally.api.app import create_app
from tally.auth.service import Scope as KeyScope
from tally.bootstrap import Services, build
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.settings import Settings
from tests.conftest import event

EXAMPLES_PER_OPERATION = 25

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
# A well-formed batch holding invalid events is answered 200 with an outcome per event (the
# valid ones are stored, the invalid ones `rejected` with their errors): by design (DESIGN.md,
# "one bad event never holds back its neighbours"), so for this operation an invalid event in
# the body is not a request the server must refuse.
ACCEPTS_INVALID_ITEMS = {("POST", "/v1/events")}


class LateApp:
    """The app under test, known only once the fixture has built it: the schema is loaded at
    import, when no store may be opened yet."""

    target: FastAPI | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.target is not None, "the `fuzzed` fixture builds the app"
        await self.target(scope, receive, send)


APP = LateApp()
# The document the app serves; building the app opens nothing (the store opens at start-up).
DOCUMENT = create_app(Settings(database_url="sqlite:///never-opened.db")).openapi()
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "generation": {
                # Unknown query parameters are ignored by every GET route (a convention of
                # the API), and the key is ours, not generated.
                "allow-extra-parameters": False,
                "with-security-parameters": False,
                # The same examples on every run: CI fails on a real finding, not on luck.
                "deterministic": True,
            }
        }
    ),
)
schema.app = APP

KEYS: dict[str, str] = {}


@pytest.fixture
def fuzzed(tmp_path: Path) -> Iterator[Services]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'tally.db'}")
    services = build(settings)
    registry = services.registry
    registry.create_tenant(TenantIn(id="acme"))
    registry.create_application(ApplicationIn(id="vm"))
    KEYS.update(
        admin=registry.create_key(KeyIn(scopes=[KeyScope.ADMIN])).key,
        writer=registry.create_key(KeyIn(scopes=[KeyScope.EVENTS_WRITE], application="vm")).key,
        reader=registry.create_key(KeyIn(scopes=[KeyScope.EVENTS_READ])).key,
        usage=registry.create_key(KeyIn(scopes=[KeyScope.USAGE_READ])).key,
    )
    APP.target = create_app(services=services)
    with TestClient(APP.target) as client:
        # What is fuzzed is what is served.
        assert client.get("/openapi.json").json() == DOCUMENT
        stored = client.post(
            "/v1/events", json=event("evt-1"), headers={"Authorization": f"Bearer {KEYS['writer']}"}
        )
        assert stored.status_code == 200, stored.text
    yield services
    APP.target = None
    services.close()


def key_for(method: str, path: str) -> str | None:
    """A key that may call the operation: what is fuzzed is the handling, not the refusal."""
    if path.startswith("/v1/events"):
        return KEYS["writer"] if method == "POST" else KEYS["reader"]
    if path.startswith(("/v1/usage", "/v1/reconciliation")):
        return KEYS["usage"]
    if path.startswith("/v1/"):
        return KEYS["admin"]
    return None


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_answer_matches_the_document(case: schemathesis.Case, fuzzed: Services) -> None:
    del fuzzed
    key = key_for(case.method.upper(), case.operation.path)
    if key is not None:
        # Set on the case itself, so schemathesis judges the request it really sends.
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
    checks = list(CHECKS)
    if (case.method.upper(), case.operation.path) in ACCEPTS_INVALID_ITEMS:
        checks.remove(negative_data_rejection)
    case.call_and_validate(checks=checks)
