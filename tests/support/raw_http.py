"""HTTP/1.1 spoken by hand over a socket, the way a careless or hostile client would, for the
end-to-end tests of the server's edge (tests/e2e/). No pytest here."""

from __future__ import annotations

import contextlib
import json
import socket

# Far beyond every limit the tests configure: reaching it means the server never gave up.
PATIENCE = 30.0


def connect(port: int, *, timeout: float = PATIENCE) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_answer(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes (b"" if it closed without a word).

    Raises TimeoutError when the server neither answers nor closes within the socket's timeout.
    """
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def send(port: int, request: bytes) -> bytes:
    """One raw request on a new connection; what came back (a reset mid-send ends it)."""
    with connect(port) as connection:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.sendall(request)
        return read_answer(connection)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def headers_of(answer: bytes) -> dict[str, str]:
    """The response's header fields, names lower-cased (the last of a repeated one)."""
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    fields = (line.split(":", 1) for line in head.split("\r\n")[1:])
    return {name.strip().lower(): value.strip() for name, value in fields}


def problem_of(answer: bytes) -> dict[str, object]:
    document: dict[str, object] = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    return document
