"""Proxy headers against real `tally serve` processes: trusted only from TALLY_TRUSTED_PROXIES.

X-Forwarded-For names the client the audit log records as `source`, and X-Forwarded-Proto the
scheme; anyone can send them, so by default nobody is trusted. A Location is never built from
the request's Host: a path with a trailing slash is a 404, not a redirect.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_keyring_serve import serve_once
from tests.support.raw_http import headers_of, problem_of, send, status_of
from tests.support.server import Server, running_server

FORGED = "203.0.113.9"


@pytest.fixture(scope="module")
def untrusting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("untrusting")
    with running_server(f"sqlite:///{folder / 'tally.db'}", folder) as server:
        yield server


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("behind-proxy")
    env = {"TALLY_TRUSTED_PROXIES": "10.9.0.0/16, 127.0.0.1"}
    with running_server(f"sqlite:///{folder / 'tally.db'}", folder, env=env) as server:
        yield server


def audited_source(server: Server, tenant: str, forwarded: dict[str, str]) -> str:
    """The audit log's `source` of creating `tenant` with the `forwarded` headers."""
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    with server.client(headers=admin) as client:
        client.post("/v1/tenants", json={"id": tenant}, headers=forwarded).raise_for_status()
        entries = client.get("/v1/audit", params={"action": "tenant.create"}).json()["entries"]
    (entry,) = (entry for entry in entries if entry["target"] == tenant)
    source: str = entry["source"]
    return source


def test_a_forged_x_forwarded_for_does_not_change_the_audit_source(untrusting: Server) -> None:
    forged = {"X-Forwarded-For": FORGED, "X-Forwarded-Proto": "https"}
    assert audited_source(untrusting, "forged", forged) == "127.0.0.1"


def test_a_trusted_proxy_names_the_client(behind_proxy: Server) -> None:
    # The proxy appends the peer it saw; the first address from outside the trusted ones counts.
    forwarded = {"X-Forwarded-For": f"{FORGED}, 10.9.1.2"}
    assert audited_source(behind_proxy, "proxied", forwarded) == FORGED


@pytest.mark.parametrize("server_name", ["untrusting", "behind_proxy"])
@pytest.mark.parametrize("path", ["/v1/events/", "/v1/tenants/", "/healthz/"])
def test_no_location_comes_from_the_host_header(
    request: pytest.FixtureRequest, server_name: str, path: str
) -> None:
    server: Server = request.getfixturevalue(server_name)
    answer = send(
        server.port,
        f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-Proto: https\r\n"
        f"X-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n".encode(),
    )
    assert b"evil.example" not in answer
    assert "location" not in headers_of(answer)
    assert status_of(answer) == 404
    assert problem_of(answer)["type"] == "/problems/not-found"


def test_the_trailing_slash_is_not_redirected_for_an_http_client(untrusting: Server) -> None:
    with untrusting.client(headers={"Host": "evil.example"}) as client:
        answer = client.post("/v1/events/", json={})
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("value", ["proxy.example", "10.0.0.0/33", "127.0.0.1;10.0.0.1"])
def test_untrusted_proxy_settings_stop_start_up_with_a_message(tmp_path: Path, value: str) -> None:
    url = f"sqlite:///{tmp_path / 'tally.db'}"
    started = serve_once(tmp_path, TALLY_DATABASE_URL=url, TALLY_TRUSTED_PROXIES=value)
    assert started.returncode != 0
    assert "TALLY_TRUSTED_PROXIES" in started.stdout + started.stderr
    assert "CIDR" in started.stdout + started.stderr
    assert not (tmp_path / "tally.db").exists()  # stopped before anything was written
