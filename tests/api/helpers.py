"""Small helpers for the HTTP API tests: posting bodies, paging the export, checking problems."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tests.conftest import World

JSON = "application/json"
CLOUDEVENT = "application/cloudevents+json"
CLOUDEVENT_BATCH = "application/cloudevents-batch+json"
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code", "request_id"}


@dataclass
class Clock:
    """The time an app built with `clock=` sees (ingest, finality, keys); tests move it."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now


def auth(key: str) -> dict[str, str]:
    return World.auth(key)


def post_events(
    client: TestClient, key: str, body: object, content_type: str = JSON
) -> httpx.Response:
    """POST /v1/events with `body` serialised as JSON (or sent as is when bytes/str)."""
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    response: httpx.Response = client.post(
        "/v1/events",
        content=content,
        headers={**auth(key), "Content-Type": content_type},
    )
    return response


def export_all(client: TestClient, key: str, **params: Any) -> list[dict[str, Any]]:
    """Every event the key sees with these filters, following the cursor to the end."""
    found: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 10_000, **params}
    while True:
        response = client.get("/v1/events", params=query, headers=auth(key))
        assert response.status_code == 200, response.text
        page = response.json()
        found.extend(page["events"])
        if not page["has_more"]:
            return found
        query["cursor"] = page["next_cursor"]


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """`response` is an RFC 9457 problem document with this status and code; returns it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert set(problem) >= PROBLEM_FIELDS, problem
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"].startswith("/problems/")
    assert problem["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return problem


def pointers(problem_or_outcome: dict[str, Any]) -> list[str]:
    return [error.get("pointer") for error in problem_or_outcome.get("errors", [])]


def parameters(problem: dict[str, Any]) -> list[str]:
    return [error.get("parameter") for error in problem.get("errors", [])]


def at(delta: timedelta) -> str:
    """An RFC 3339 UTC time `delta` from now."""
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def cloudevent(event_id: str, **data: object) -> dict[str, Any]:
    """A valid usage CloudEvent for tenant acme; `data` overrides fields of its data."""
    payload: dict[str, object] = {"tenant": "acme", "quantity": "2"}
    payload.update(data)
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/apps/vm",
        "type": "compute.vcpu_seconds",
        "time": at(timedelta(0)),
        "data": payload,
    }
