"""A real `tally serve` on an SQLite store with a tenant, an application and keys, for the
SDK's tests; and `exported_ids`, which reads the export without the SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import Server, running_server

ENV = {"TALLY_REGION": "local"}


@dataclass(frozen=True)
class Deployment:
    server: Server
    database_url: str
    workdir: Path
    writer: str
    reader: str


def call(server: Server, method: str, path: str, key: str, **options: Any) -> httpx.Response:
    """One request, repeated after Retry-After while rate limited (some tests limit keys)."""
    while True:
        answer = httpx.request(
            method,
            f"{server.base_url}{path}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
            **options,
        )
        if answer.status_code != 429:
            return answer
        time.sleep(float(answer.headers["retry-after"]))


def register(server: Server) -> tuple[str, str]:
    """Tenant acme, application vm: (a write key for vm, a read key)."""
    for path, body in [("/v1/tenants", {"id": "acme"}), ("/v1/applications", {"id": "vm"})]:
        made = call(server, "POST", path, server.admin_key, json=body)
        assert made.status_code == 201, made.text
    keys = []
    for spec in [{"scopes": ["events:write"], "application": "vm"}, {"scopes": ["events:read"]}]:
        made = call(server, "POST", "/v1/keys", server.admin_key, json=spec)
        assert made.status_code == 201, made.text
        keys.append(made.json()["key"])
    return keys[0], keys[1]


def exported_ids(server: Server, reader: str) -> list[str]:
    """Every exported event's id, in log order, paged with plain HTTP."""
    ids: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": 1000} | ({"cursor": cursor} if cursor else {})
        page = call(server, "GET", "/v1/events", reader, params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        ids += [event["id"] for event in body["events"]]
        cursor = body["next_cursor"]
        if not body["has_more"]:
            return ids


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tally.db'}"


def deploy(
    sqlite_url: str, workdir: Path, env: dict[str, str] | None = None
) -> Iterator[Deployment]:
    """A registered deployment while iterated (once); its server stops afterwards."""
    try:
        with running_server(sqlite_url, workdir, env=ENV | (env or {})) as server:
            assert server.admin_key, server.logs()
            writer, reader = register(server)
            yield Deployment(server, sqlite_url, workdir, writer, reader)
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture
def deployment(sqlite_url: str, tmp_path: Path) -> Iterator[Deployment]:
    yield from deploy(sqlite_url, tmp_path)
