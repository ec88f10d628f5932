"""POST /v1/events is answered by api/fastpath.py, past FastAPI's routing: every answer must
be the one the FastAPI route (which the OpenAPI document describes) gives. The same requests
go through both, on one app, and their answers are compared."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.api.fastpath import FastIngest
from tally.bootstrap import Services
from tests.conftest import World, event

RequestSpec = tuple[str, dict[str, Any]]
CLOUDEVENT = "application/cloudevents+json"


def _requests(world: World, run: str) -> list[RequestSpec]:
    """(label, httpx request options) of answers of every kind."""

    def key(secret: str, kind: str = "application/json", **more: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}", "Content-Type": kind, **more}

    writer, acme_writer = key(world.writer), key(world.acme_writer)
    batch = json.dumps({"events": [event(f"{run}-b1"), event(f"{run}-b1"), {"id": 1}]})
    zipped = gzip.compress(json.dumps(event(f"{run}-6")).encode())
    cloudevent = {
        "specversion": "1.0",
        "id": f"{run}-7",
        "source": "s",
        "type": "t.x",
        "time": event("x")["time"],
        "data": {"tenant": "acme", "quantity": 1},
    }
    return [
        ("one accepted", {"json": event(f"{run}-1"), "headers": writer}),
        ("its duplicate", {"json": event(f"{run}-1"), "headers": writer}),
        ("a conflict", {"json": event(f"{run}-1", quantity="2"), "headers": writer}),
        ("invalid", {"json": event(f"{run}-2", quantity="-1"), "headers": writer}),
        ("a batch", {"content": batch, "headers": writer}),
        ("no key", {"json": event(f"{run}-3")}),
        ("a bad key", {"json": event(f"{run}-3"), "headers": key("tly_x")}),
        ("a reader", {"json": event(f"{run}-3"), "headers": key(world.reader)}),
        ("another tenant", {"json": event(f"{run}-4", tenant="globex"), "headers": acme_writer}),
        ("a query", {"json": event(f"{run}-5"), "headers": writer, "params": {"tenant": "acme"}}),
        ("text", {"content": "x", "headers": key(world.writer, "text/plain")}),
        ("not json", {"content": "{", "headers": writer}),
        ("gzip", {"content": zipped, "headers": key(world.writer, **{"Content-Encoding": "gzip"})}),
        ("too large", {"content": b"[" + b" " * (2 << 20) + b"]", "headers": writer}),
        ("cloudevent", {"json": cloudevent, "headers": key(world.writer, CLOUDEVENT)}),
    ]  # fmt: skip


def _answer(response: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        body.pop("request_id", None)
    kept = ("content-type", "www-authenticate", "retry-after", "ratelimit-limit")
    return (
        response.status_code,
        body,
        {k: response.headers[k] for k in kept if k in response.headers},
    )


def test_the_fast_path_answers_as_the_fastapi_route(services: Services, world: World) -> None:
    app = create_app(services=services)
    assert app.fast is not None
    answers: dict[str, list[tuple[int, Any, dict[str, str]]]] = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        for path, fast in (("run-fast", app.fast), ("run-route", None)):
            app.fast = fast
            for label, options in _requests(world, path):
                answer = _answer(client.post("/v1/events", **options))
                answers.setdefault(label, []).append(
                    json.loads(json.dumps(answer).replace(path, "RUN"))
                )
    for label, (fast, route) in answers.items():
        assert fast == route, label
    assert answers["one accepted"][0][0] == 200
    assert answers["no key"][0][0] == 401


def test_only_post_v1_events_takes_the_fast_path() -> None:
    def scope(method: str, path: str, kind: str = "http") -> dict[str, Any]:
        return {"type": kind, "method": method, "path": path}

    assert FastIngest.serves(scope("POST", "/v1/events"))
    assert not FastIngest.serves(scope("GET", "/v1/events"))
    assert not FastIngest.serves(scope("POST", "/v1/events/"))
    assert not FastIngest.serves(scope("POST", "/v1/cancellations"))
    assert not FastIngest.serves({"type": "lifespan"} | {"method": "POST", "path": "/v1/events"})
