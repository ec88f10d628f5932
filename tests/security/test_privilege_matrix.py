"""Every route, called by every kind of caller, answers exactly as the table below says.

The table is the authority: a route the app serves that has no row fails
`test_every_route_has_a_row`, so a new route cannot ship without its line here. Each row is
one route and the status each kind of caller gets. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.auth import keys
from tally.auth.service import Scope
from tally.bootstrap import build
from tally.registry.audit import SYSTEM
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.services.usage import MeterSpec
from tally.settings import Settings
from tally.store.interface import EventStore
from tests.conftest import event

# The kinds of caller, in the order of the columns below.
CALLERS = (
    "none",  # no Authorization header
    "malformed",  # not a Tally key (bad checksum)
    "unknown",  # a well-formed key Tally never issued
    "expired",  # issued, past its expiry
    "revoked",  # issued, revoked
    "admin",  # admin
    "writer",  # events:write, application vm
    "reader",  # events:read
    "usage",  # usage:read
)

_ids = itertools.count()
# The day before and the day after now, for the reconciliation routes.
_NOW = datetime.now(UTC)
_DAY = (
    f"from={(_NOW - timedelta(days=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    f"&to={(_NOW + timedelta(days=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}&period=day"
)


def _new_event(_: Matrix) -> dict[str, Any]:
    return {"json": event(f"evt-matrix-{next(_ids)}")}


def _new_id(_: Matrix) -> dict[str, Any]:
    return {"json": {"id": f"matrix-{next(_ids)}"}}


def _new_meter(_: Matrix) -> dict[str, Any]:
    return {
        "json": {"id": f"meter-{next(_ids)}", "type": "compute.vcpu_seconds", "aggregation": "sum"}
    }


_SPAN = "from=2020-01-01T00:00:00Z&to=2100-01-01T00:00:00Z"

# route: (how to call it, the status of each caller in CALLERS order)
# fmt: off
MATRIX: dict[str, tuple[Callable[[Matrix], dict[str, Any]] | None, str]] = {
    #                                          request                                  none malf unkn expd revk admn writ read usag  # noqa: E501
    "POST /v1/events":                        (_new_event,                              "401  401  401  401  401  403  200  403  403"),  # noqa: E501
    "GET /v1/events":                         (None,                                    "401  401  401  401  401  403  403  200  403"),  # noqa: E501
    "GET /v1/events/{application}/{event_id}": (lambda m: {"path": "/v1/events/vm/evt-acme"}, "401  401  401  401  401  403  403  200  403"),  # noqa: E501
    "POST /v1/events/{application}/{event_id}/cancel": (lambda m: {"path": "/v1/events/vm/evt-acme/cancel", "json": {"reason": "matrix"}}, "401  401  401  401  401  200  200  403  403"),  # noqa: E501
    "GET /v1/tenants":                        (None,                                    "401  401  401  401  401  200  403  403  403"),  # noqa: E501
    "POST /v1/tenants":                       (_new_id,                                 "401  401  401  401  401  201  403  403  403"),  # noqa: E501
    "GET /v1/tenants/{tenant_id}":            (lambda m: {"path": "/v1/tenants/acme"},  "401  401  401  401  401  200  403  403  403"),  # noqa: E501
    "PATCH /v1/tenants/{tenant_id}":          (lambda m: {"path": "/v1/tenants/globex", "json": {"lateness_hours": 48}}, "401  401  401  401  401  200  403  403  403"),  # noqa: E501
    "GET /v1/applications":                   (None,                                    "401  401  401  401  401  200  403  403  403"),  # noqa: E501
    "POST /v1/applications":                  (_new_id,                                 "401  401  401  401  401  201  403  403  403"),  # noqa: E501
    "GET /v1/keys":                           (None,                                    "401  401  401  401  401  200  403  403  403"),  # noqa: E501
    "POST /v1/keys":                          (lambda m: {"json": {"scopes": ["events:read"]}}, "401  401  401  401  401  201  403  403  403"),  # noqa: E501
    "DELETE /v1/keys/{key_id}":               (lambda m: {"path": f"/v1/keys/{m.spare_ids[0]}"}, "401  401  401  401  401  204  403  403  403"),  # noqa: E501
    "POST /v1/keys/{key_id}/rotate":          (lambda m: {"path": f"/v1/keys/{m.spare_ids[1]}/rotate", "json": {"grace_seconds": 0}}, "401  401  401  401  401  201  403  403  403"),  # noqa: E501
    "GET /v1/reconciliation":                 (lambda m: {"path": f"/v1/reconciliation?{_DAY}"}, "401  401  401  401  401  403  403  403  200"),  # noqa: E501
    "GET /v1/usage":                          (lambda m: {"path": f"/v1/usage?{_SPAN}"}, "401  401  401  401  401  403  403  403  200"),  # noqa: E501
    "POST /v1/meters":                        (_new_meter,                              "401  401  401  401  401  201  403  403  403"),  # noqa: E501
    "GET /v1/meters":                         (None,                                    "401  401  401  401  401  200  403  403  200"),  # noqa: E501
    "GET /v1/meters/{meter_id}":              (lambda m: {"path": "/v1/meters/kept"},   "401  401  401  401  401  200  403  403  200"),  # noqa: E501
    "DELETE /v1/meters/{meter_id}":           (lambda m: {"path": "/v1/meters/doomed"}, "401  401  401  401  401  204  403  403  403"),  # noqa: E501
    "GET /v1/meters/{meter_id}/usage":        (lambda m: {"path": f"/v1/meters/kept/usage?{_SPAN}"}, "401  401  401  401  401  403  403  403  200"),  # noqa: E501
    "GET /v1/audit":                          (None,                                    "401  401  401  401  401  200  403  403  403"),  # noqa: E501
    "GET /healthz":                           (None,                                    "200  200  200  200  200  200  200  200  200"),  # noqa: E501
    "GET /readyz":                            (None,                                    "200  200  200  200  200  200  200  200  200"),  # noqa: E501
    "GET /metrics":                           (None,                                    "401  401  401  401  401  200  403  403  403"),  # noqa: E501
    "GET /openapi.json":                      (None,                                    "200  200  200  200  200  200  200  200  200"),  # noqa: E501
    "GET /docs":                              (None,                                    "200  200  200  200  200  200  200  200  200"),  # noqa: E501
    "GET /docs/assets/{name}":                (lambda m: {"path": "/docs/assets/swagger-ui/swagger-ui.css"}, "200  200  200  200  200  200  200  200  200"),  # noqa: E501
    "GET /redoc":                             (None,                                    "200  200  200  200  200  200  200  200  200"),  # noqa: E501
}

# Keys restricted to tenant acme, used on tenant globex's data and on acme's own.
# Each: caller, method, path, body, status.
TENANT_CASES: list[tuple[str, str, str, dict[str, Any] | None, int]] = [
    ("acme_reader", "GET", "/v1/events?tenant=globex", None, 403),
    ("acme_reader", "GET", "/v1/events?tenant=acme", None, 200),
    ("acme_reader", "GET", "/v1/events/vm/evt-globex", None, 404),  # as if there were none
    ("acme_reader", "GET", "/v1/events/vm/evt-acme", None, 200),
    ("acme_writer", "POST", "/v1/events", event("evt-tenant-1", tenant="globex"), 403),
    ("acme_writer", "POST", "/v1/events", event("evt-tenant-2", tenant="acme"), 200),
    ("acme_usage", "GET", f"/v1/reconciliation?tenant=globex&{_DAY}", None, 403),
    ("acme_usage", "GET", f"/v1/reconciliation?tenant=acme&{_DAY}", None, 200),
    ("acme_writer", "POST", "/v1/events/vm/evt-globex/cancel", {"reason": "x"}, 404),
    ("acme_writer", "POST", "/v1/events/vm/evt-acme/cancel", {"reason": "x"}, 200),
    ("acme_usage", "GET", f"/v1/usage?tenant=globex&{_SPAN}", None, 403),
    ("acme_usage", "GET", f"/v1/usage?tenant=acme&{_SPAN}", None, 200),
    ("acme_usage", "GET", f"/v1/meters/kept/usage?tenant=globex&{_SPAN}", None, 403),
    ("acme_usage", "GET", f"/v1/meters/kept/usage?tenant=acme&{_SPAN}", None, 200),
]
# fmt: on

_CONVERTER = re.compile(r":[a-z]+}")


@dataclass
class Matrix:
    client: TestClient
    keys: dict[str, str | None]
    spare_ids: list[str]


class ShiftedClock:
    """Real time, moved forward on demand: keys that expire in an hour are expired after."""

    def __init__(self) -> None:
        self.shift = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.shift


@pytest.fixture
def matrix(settings: Settings, store: EventStore) -> Iterator[Matrix]:
    clock = ShiftedClock()
    services = build(settings, store=store, clock=clock)
    registry = services.registry
    registry.create_tenant(TenantIn(id="acme"))
    registry.create_tenant(TenantIn(id="globex"))
    registry.create_application(ApplicationIn(id="vm"))

    def key(*scopes: Scope, **spec: Any) -> str:
        return registry.create_key(KeyIn.model_validate({"scopes": scopes, **spec})).key

    writer = key(Scope.EVENTS_WRITE, application="vm")
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    revoked = registry.create_key(KeyIn(scopes=[Scope.EVENTS_READ]))
    registry.revoke_key(revoked.id)
    spares = [registry.create_key(KeyIn(scopes=[Scope.EVENTS_READ])) for _ in range(2)]
    found: dict[str, str | None] = {
        "none": None,
        "malformed": writer[:-1] + ("A" if writer[-1] != "A" else "B"),
        "unknown": keys.new_secret(),
        "expired": key(Scope.ADMIN, expires_at=soon),
        "revoked": revoked.key,
        "admin": key(Scope.ADMIN),
        "writer": writer,
        "reader": key(Scope.EVENTS_READ),
        "usage": key(Scope.USAGE_READ),
        "acme_reader": key(Scope.EVENTS_READ, tenants=["acme"]),
        "acme_writer": key(Scope.EVENTS_WRITE, application="vm", tenants=["acme"]),
        "acme_usage": key(Scope.USAGE_READ, tenants=["acme"]),
    }
    for meter in ("kept", "doomed"):
        spec = MeterSpec(id=meter, type="compute.vcpu_seconds", aggregation="sum")
        services.usage.create_meter(spec, actor=SYSTEM)
    app = create_app(services=services)
    with TestClient(app, raise_server_exceptions=False) as client:
        for name, tenant in (("evt-acme", "acme"), ("evt-globex", "globex")):
            stored = client.post(
                "/v1/events",
                json=event(name, tenant=tenant, attributes={"zone": "z1"}),
                headers={"Authorization": f"Bearer {writer}"},
            )
            assert stored.status_code == 200, stored.text
        clock.shift = timedelta(hours=2)  # the expiring key has now expired
        yield Matrix(client, found, [spare.id for spare in spares])
    services.committer.close()


def routes_of(app: FastAPI) -> set[str]:
    """'METHOD /path' of every route the app serves: the OpenAPI document's operations and
    the routes left out of it (the documentation pages), HEAD aside."""
    found = {
        f"{method.upper()} {path}"
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }

    def walk(routes: list[Any]) -> None:
        for route in routes:
            methods, path = getattr(route, "methods", None), getattr(route, "path", None)
            if methods and path:
                found.update(f"{m} {_CONVERTER.sub('}', path)}" for m in methods - {"HEAD"})
            inner = getattr(route, "routes", None)
            inner = inner or getattr(getattr(route, "original_router", None), "routes", None)
            if inner:
                walk(list(inner))
            elif path and not methods:
                found.add(f"* {path}")  # a mounted application: every method

    walk(list(app.routes))
    return found


def test_every_route_has_a_row(tmp_path: Path) -> None:
    # Building the app connects nothing: the store opens at start-up, which this never does.
    served = routes_of(create_app(Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}")))

    assert served - set(MATRIX) == set(), "routes without a row in MATRIX: add one each"
    assert set(MATRIX) - served == set(), "rows for routes the app no longer serves"


def _call(matrix: Matrix, route: str, caller: str) -> int:
    method, template = route.split(" ", 1)
    build_request, _ = MATRIX[route]
    request = build_request(matrix) if build_request else {}
    secret = matrix.keys[caller]
    headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
    response = matrix.client.request(
        method, request.get("path", template), json=request.get("json"), headers=headers
    )
    return response.status_code


@pytest.mark.parametrize("route", sorted(MATRIX))
def test_each_caller_gets_the_status_in_the_table(matrix: Matrix, route: str) -> None:
    expected = dict(zip(CALLERS, (int(s) for s in MATRIX[route][1].split()), strict=True))
    # The admin's call changes state (it creates or revokes): it goes last.
    order = [c for c in CALLERS if c != "admin"] + ["admin"]

    got = {caller: _call(matrix, route, caller) for caller in order}

    assert got == expected


@pytest.mark.parametrize(("caller", "method", "path", "body", "status"), TENANT_CASES)
def test_tenant_restricted_keys_get_only_their_tenants(
    matrix: Matrix,
    *,
    caller: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
) -> None:
    response = matrix.client.request(
        method, path, json=body, headers={"Authorization": f"Bearer {matrix.keys[caller]}"}
    )

    assert response.status_code == status, response.text


def test_a_tenant_restricted_export_without_a_filter_holds_only_its_tenants(
    matrix: Matrix,
) -> None:
    response = matrix.client.get(
        "/v1/events", headers={"Authorization": f"Bearer {matrix.keys['acme_reader']}"}
    )

    assert response.status_code == 200
    assert {e["tenant"] for e in response.json()["events"]} == {"acme"}


def test_a_tenant_restricted_reconciliation_without_a_filter_holds_only_its_tenants(
    matrix: Matrix,
) -> None:
    response = matrix.client.get(
        f"/v1/reconciliation?{_DAY}",
        headers={"Authorization": f"Bearer {matrix.keys['acme_usage']}"},
    )

    assert response.status_code == 200, response.text
    assert {row["tenant"] for row in response.json()["rows"]} == {"acme"}
