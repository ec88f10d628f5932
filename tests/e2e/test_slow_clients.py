"""Slow and early-refused clients against a real `tally serve` with a small connection cap.

A route may answer before it reads the body (401 before authentication, 413 for a declared
length over the limit). The server then closes the connection, after a bounded lingering close,
so that a client dribbling a body cannot hold a connection for ever, while one that sends its
body at once still reads the answer instead of a reset. A TLS connection that never sends its
ClientHello is closed within the keep-alive bound too. Bounds are asserted with slack for a
loaded machine; a server that never gives up fails them by far.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import httpx
import pytest
import trustme

from tests.support.raw_http import (
    connect,
    headers_of,
    problem_of,
    read_answer,
    status_of,
)
from tests.support.server import Server, running_server

CAP = 5
REQUEST_TIMEOUT = 2
KEEPALIVE = 1
SLACK = 4.0  # seconds a loaded machine may add to a bound
LIMITS = {
    "TALLY_MAX_CONNECTIONS": str(CAP),
    "TALLY_REQUEST_TIMEOUT_SECONDS": str(REQUEST_TIMEOUT),
    "TALLY_KEEPALIVE_TIMEOUT_SECONDS": str(KEEPALIVE),
    "TALLY_MAX_BODY_BYTES": "4096",
}
OVERSIZE = 1024 * 1024 + 200 * 1024  # 1.2 MiB, far over the 4 KiB limit


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("capped")
    with running_server(f"sqlite:///{folder / 'tally.db'}", folder, env=LIMITS) as server:
        yield server


def unauthenticated_post(declared: int) -> bytes:
    return (
        f"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()


def closed_by_server(connection: socket.socket) -> bool:
    """Whether the server has closed `connection` (what it sent before is read and dropped)."""
    connection.setblocking(False)
    try:
        while True:
            if connection.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True
    finally:
        connection.setblocking(True)


def test_dribbling_unauthenticated_clients_are_cut_off_and_healthz_stays_up(
    capped: Server,
) -> None:
    # Each sends a 1 GB Content-Length, reads its 401, then a byte every half second: before,
    # every byte reset the keep-alive timer and the four held CAP - 1 connections for ever.
    dribblers = [connect(capped.port) for _ in range(CAP - 1)]
    started = time.monotonic()
    try:
        for connection in dribblers:
            connection.sendall(unauthenticated_post(1_000_000_000))
        for connection in dribblers:
            connection.settimeout(REQUEST_TIMEOUT + SLACK)
            answer = connection.recv(65536)
            assert status_of(answer) == 401
            assert headers_of(answer)["connection"] == "close"
        open_ones = list(dribblers)
        bound = KEEPALIVE + SLACK  # the lingering close lasts at most the keep-alive timeout
        while open_ones and time.monotonic() - started < bound + 10:
            for connection in list(open_ones):
                try:
                    connection.sendall(b"x")
                except OSError:
                    open_ones.remove(connection)
                    continue
                if closed_by_server(connection):
                    open_ones.remove(connection)
            time.sleep(0.5)
        held_for = time.monotonic() - started
    finally:
        for connection in dribblers:
            connection.close()
    assert not open_ones, f"{len(open_ones)} dribbling connections still open after {held_for:.1f}s"
    assert held_for < bound
    assert httpx.get(f"{capped.base_url}/healthz", timeout=SLACK).status_code == 200


def test_healthz_answers_while_clients_dribble(capped: Server) -> None:
    # The same attack, running: /healthz is answered once the refused connections are closed,
    # though their clients keep sending.
    dribblers = [connect(capped.port) for _ in range(CAP - 1)]
    try:
        for connection in dribblers:
            connection.sendall(unauthenticated_post(1_000_000_000))
        deadline = time.monotonic() + KEEPALIVE + SLACK
        healthy = False
        while not healthy and time.monotonic() < deadline:
            for connection in dribblers:
                with contextlib.suppress(OSError):
                    connection.sendall(b"x")
            healthy = httpx.get(f"{capped.base_url}/healthz", timeout=SLACK).status_code == 200
            time.sleep(0.25)
    finally:
        for connection in dribblers:
            connection.close()
    assert healthy


def test_a_keep_alive_connection_fed_blank_lines_is_closed(capped: Server) -> None:
    # Blank lines before a request line are allowed and start no request: they must not
    # restart the keep-alive timer either.
    with connect(capped.port) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status_of(connection.recv(65536)) == 200
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < KEEPALIVE + SLACK + 10:
            try:
                connection.sendall(b"\r\n")
            except OSError:
                break
            closed = closed_by_server(connection)
            time.sleep(0.25)
    assert time.monotonic() - started < KEEPALIVE + SLACK


@pytest.mark.parametrize("path", ["/v1/events", "/v1/tenants"])
def test_urllib_sending_a_body_over_the_limit_reads_the_refusal(capped: Server, path: str) -> None:
    # /v1/events refuses a bad key (401), /v1/tenants an admin's body by its declared size
    # (413): both before reading it. Before, the server closed with the body unread and the
    # client, still sending, often got a reset instead of the answer.
    body = b"{" + b" " * OVERSIZE + b"}"
    expected, key = (401, "tly_nope") if path == "/v1/events" else (413, capped.admin_key)
    for _ in range(10):
        request = urllib.request.Request(  # noqa: S310 - a fixed http URL of the test server
            capped.base_url + path,
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT + SLACK)  # noqa: S310
        assert refused.value.code == expected
        assert refused.value.headers["Content-Type"] == "application/problem+json"


def test_a_raw_client_sending_a_body_over_the_limit_reads_the_413(capped: Server) -> None:
    head = (
        f"POST /v1/tenants HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {capped.admin_key}\r\nContent-Length: {OVERSIZE}\r\n\r\n"
    ).encode()
    for _ in range(10):
        with connect(capped.port, timeout=REQUEST_TIMEOUT + SLACK) as connection:
            connection.sendall(head + b" " * OVERSIZE)  # raises if the server reset it
            answer = read_answer(connection)
        assert status_of(answer) == 413
        assert problem_of(answer)["type"] == "/problems/payload-too-large"


def test_a_client_that_stops_reading_its_answers_is_cut_off(capped: Server) -> None:
    # Pipelined requests for the OpenAPI document, whose answers are never read: before, the
    # server waited for ever for room to write them.
    requests = 200
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.settimeout(REQUEST_TIMEOUT + SLACK)
        connection.connect(("127.0.0.1", capped.port))
        connection.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n" * requests)
        time.sleep(REQUEST_TIMEOUT + 2)  # the server's buffer fills, and stays full
        answered = b""
        with contextlib.suppress(OSError):  # a reset, or the idle timeout after the last answer
            while chunk := connection.recv(1 << 20):
                answered += chunk
    assert answered.count(b"HTTP/1.1 200 ") < requests
    assert httpx.get(f"{capped.base_url}/healthz", timeout=SLACK).status_code == 200


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("tls-slow")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    leaf.private_key_pem.write_to_path(str(folder / "server.key"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    env = LIMITS | {
        "TALLY_TLS_CERT": str(folder / "server.pem"),
        "TALLY_TLS_KEY": str(folder / "server.key"),
    }
    with running_server(f"sqlite:///{folder / 'tally.db'}", folder, env=env, tls=client) as server:
        yield server


def test_a_tls_connection_that_never_says_hello_is_closed_in_time(tls_server: Server) -> None:
    # Before, asyncio's default handshake timeout held it for 60 s.
    started = time.monotonic()
    with connect(tls_server.port) as connection:
        assert read_answer(connection) == b""
    assert time.monotonic() - started < KEEPALIVE + SLACK


def test_a_tls_client_is_still_served(tls_server: Server) -> None:
    with tls_server.client(timeout=SLACK) as client:
        assert client.get("/healthz").status_code == 200
