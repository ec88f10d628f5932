"""Resource limits (OWASP API4) of a real `tally serve`: one client cannot exhaust the server.

Each limit is set low through its TALLY_* variable and then hit with raw sockets, the way a
careless or hostile client would: oversized and endless headers, headers or a body dribbled
slowly, idle connections, more connections than the cap. Waits are bounded generously and
never asserted on: a test fails when the server *never* gives up, not when it is slow to.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import event
from tests.support.raw_http import (
    PATIENCE,
    connect,
    headers_of,
    problem_of,
    read_answer,
    send,
    status_of,
)
from tests.support.server import Server, running_server

MAX_HEADER_BYTES = 8192
REQUEST_TIMEOUT = 2

LIMITS = {
    "TALLY_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "TALLY_REQUEST_TIMEOUT_SECONDS": str(REQUEST_TIMEOUT),
    "TALLY_KEEPALIVE_TIMEOUT_SECONDS": "1",
    "TALLY_MAX_BODY_BYTES": "4096",
    "TALLY_MAX_BATCH_EVENTS": "3",
}


def start(tmp: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[Server]:
    return running_server(f"sqlite:///{tmp / 'tally.db'}", tmp, env=env)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start(tmp_path_factory.mktemp("limited"), LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def writer(limited: Server) -> str:
    """An events:write key for tenant acme on the `limited` server."""
    admin = {"Authorization": f"Bearer {limited.admin_key}"}
    with limited.client(headers=admin, timeout=PATIENCE) as client:
        client.post("/v1/tenants", json={"id": "acme"}).raise_for_status()
        client.post("/v1/applications", json={"id": "vm"}).raise_for_status()
        issued = client.post("/v1/keys", json={"scopes": ["events:write"], "application": "vm"})
    issued.raise_for_status()
    key: str = issued.json()["key"]
    return key


def get_with_headers(header_bytes: int, *, lines: int = 1) -> bytes:
    each = "a" * (header_bytes // lines)
    padding = "".join(f"X-Pad-{i}: {each}\r\n" for i in range(lines))
    return f"GET /healthz HTTP/1.1\r\nHost: t\r\n{padding}Connection: close\r\n\r\n".encode()


def assert_edge_problem(answer: bytes, *, code: str, slug: str) -> None:
    """`answer` is a problem document the server's edge made: its code and type, a request id
    that its X-Request-Id repeats, and the connection closed."""
    headers = headers_of(answer)
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    problem = problem_of(answer)
    assert (problem["code"], problem["type"], problem["status"]) == (
        code,
        f"/problems/{slug}",
        status_of(answer),
    )
    assert problem["request_id"] == headers["x-request-id"]
    assert isinstance(problem["title"], str)
    assert isinstance(problem["detail"], str)


# --- headers -------------------------------------------------------------------------------------


def test_headers_under_the_limit_are_served(limited: Server) -> None:
    assert status_of(send(limited.port, get_with_headers(MAX_HEADER_BYTES // 2, lines=4))) == 200


@pytest.mark.parametrize("lines", [2, 1], ids=["many-headers", "one-long-header"])
def test_headers_just_over_the_limit_get_431(limited: Server, lines: int) -> None:
    answer = send(limited.port, get_with_headers(MAX_HEADER_BYTES + 1024, lines=lines))
    assert status_of(answer) == 431
    assert_edge_problem(answer, code="ERR-VAL-400", slug="request-header-fields-too-large")


@pytest.mark.parametrize("lines", [1000, 1], ids=["many-headers", "one-long-header"])
def test_a_megabyte_of_headers_is_cut_off(limited: Server, lines: int) -> None:
    # The server stops reading and closes: the client may see the 431 or a reset while it is
    # still sending. It must never see the request served.
    answer = send(limited.port, get_with_headers(1024 * 1024, lines=lines))
    assert answer == b"" or status_of(answer) == 431
    assert status_of(send(limited.port, get_with_headers(100))) == 200  # and the server is fine


def test_headers_that_never_finish_get_408(limited: Server) -> None:
    with connect(limited.port) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        answer = read_answer(connection)  # the headers' end never comes
    assert status_of(answer) == 408
    assert_edge_problem(answer, code="ERR-VAL-400", slug="request-timeout")


def test_headers_dribbled_byte_by_byte_get_408(limited: Server) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"X-Slow: " + b"a" * 10_000
    with connect(limited.port) as connection:
        connection.settimeout(0.2)
        answer = b""
        deadline = time.monotonic() + PATIENCE
        for byte in request:  # each byte restarts no clock: the limit is on the whole
            if time.monotonic() > deadline:
                break
            try:
                connection.sendall(bytes([byte]))
                answer += connection.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if answer:
                break
    assert status_of(answer) == 408


# --- body ---------------------------------------------------------------------------------------


def post(key: str, body: bytes, *, declared: int | None = None) -> bytes:
    length = len(body) if declared is None else declared
    head = (
        f"POST /v1/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def test_a_body_dribbled_too_slowly_gets_a_408_problem(limited: Server, writer: str) -> None:
    body = json.dumps(event("slow-1")).encode()
    with connect(limited.port) as connection:
        connection.sendall(post(writer, b"", declared=len(body)))
        connection.settimeout(0.5)
        answer = b""
        deadline = time.monotonic() + PATIENCE
        for byte in body[:-1]:  # never the last byte
            if answer or time.monotonic() > deadline:
                break
            connection.sendall(bytes([byte]))
            with contextlib.suppress(TimeoutError):
                answer += connection.recv(65536)
        connection.settimeout(PATIENCE)
        answer += read_answer(connection)
    assert status_of(answer) == 408
    problem = problem_of(answer)
    assert problem["code"] == "ERR-VAL-400"
    assert problem["type"] == "/problems/request-timeout"


def test_a_body_over_the_configured_size_gets_413(limited: Server, writer: str) -> None:
    body = json.dumps({"events": [event("big", attributes={"pad": "x" * 200})] * 3}).encode()
    body += b" " * (4097 - len(body))
    answer = send(limited.port, post(writer, body))
    assert status_of(answer) == 413
    assert problem_of(answer)["type"] == "/problems/payload-too-large"


def test_a_batch_over_the_configured_size_is_refused_whole(limited: Server, writer: str) -> None:
    batch = json.dumps({"events": [event(f"many-{i}") for i in range(4)]}).encode()
    answer = send(limited.port, post(writer, batch))
    assert status_of(answer) == 400
    assert problem_of(answer)["errors"] == [
        {"pointer": "/events", "detail": "must hold 1 to 3 events"}
    ]
    exactly = json.dumps({"events": [event(f"three-{i}") for i in range(3)]}).encode()
    assert (
        json.loads(send(limited.port, post(writer, exactly)).split(b"\r\n\r\n", 1)[1])["accepted"]
        == 3
    )


# --- idle connections ---------------------------------------------------------------------------


def test_a_connection_that_never_sends_is_closed(limited: Server) -> None:
    with connect(limited.port) as connection:
        assert read_answer(connection) == b""


def test_an_idle_keep_alive_connection_is_closed(limited: Server) -> None:
    with connect(limited.port) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_answer(connection)  # returns once the server closes the idle connection
    assert status_of(answer) == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost t\r\n\r\n",  # a header without its colon
        b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
    ],
    ids=["garbage", "header-without-colon", "bad-content-length"],
)
def test_malformed_http_gets_a_400_problem(limited: Server, request_bytes: bytes) -> None:
    answer = send(limited.port, request_bytes)
    assert status_of(answer) == 400
    assert_edge_problem(answer, code="ERR-VAL-400", slug="malformed-request")


# --- connections --------------------------------------------------------------------------------


def test_connections_over_the_cap_get_503_until_some_close(tmp_path: Path) -> None:
    cap = 4
    env = {"TALLY_MAX_CONNECTIONS": str(cap), "TALLY_KEEPALIVE_TIMEOUT_SECONDS": "300"}
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    with start(tmp_path, env) as server:
        held: list[socket.socket] = []
        try:
            # One client opens keep-alive connections one after another; each is served
            # while the open ones (itself included) stay under the cap, and stays open.
            for _ in range(cap - 1):
                held.append(connect(server.port))
                held[-1].sendall(request)
                assert status_of(held[-1].recv(65536)) == 200
            refused = send(
                server.port, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
            )
        finally:
            for connection in held:
                connection.close()
        assert status_of(refused) == 503
        assert_edge_problem(refused, code="ERR-SYS-503", slug="service-unavailable")
        assert headers_of(refused)["retry-after"] == "1"

        deadline = time.monotonic() + PATIENCE
        while True:  # the server sees the held connections close on its own time
            answer = httpx.get(f"{server.base_url}/healthz", timeout=PATIENCE)
            if answer.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer.status_code == 200
        # The refusal counts in the metrics like any answer, under its route.
        assert answered(server, route="/healthz", method="GET", status=503) >= 1


def answered(server: Server, *, route: str, method: str, status: int) -> float:
    """tally_http_requests_total of `server` for this route, method and status."""
    scraped = httpx.get(
        f"{server.base_url}/metrics",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=PATIENCE,
    )
    assert scraped.status_code == 200, scraped.text
    series = f'tally_http_requests_total{{method="{method}",route="{route}",status="{status}"}}'
    lines = [line for line in scraped.text.splitlines() if line.startswith(series + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_edge_refusals_count_in_the_metrics(limited: Server) -> None:
    before = answered(limited, route="unmatched", method="OTHER", status=431)
    assert status_of(send(limited.port, get_with_headers(MAX_HEADER_BYTES * 2))) == 431
    assert answered(limited, route="unmatched", method="OTHER", status=431) == before + 1


def test_an_admin_body_dribbled_too_slowly_gets_a_408_problem(limited: Server) -> None:
    # Admin bodies are read by FastAPI, not by the events route's own reader: the bound on
    # them lives in the request middleware.
    body = json.dumps({"id": "slow-tenant"}).encode()
    head = (
        f"POST /v1/tenants HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {limited.admin_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with connect(limited.port) as connection:
        connection.sendall(head.encode() + body[:3])  # and the rest never comes
        connection.settimeout(PATIENCE)
        answer = read_answer(connection)
    assert status_of(answer) == 408
    assert problem_of(answer)["type"] == "/problems/request-timeout"
    with limited.client() as client:
        listed = client.get("/v1/tenants", headers={"Authorization": f"Bearer {limited.admin_key}"})
    assert "slow-tenant" not in listed.text
