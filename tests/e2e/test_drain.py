"""SIGTERM drains a real `tally serve` (api/drain.py): a request running when the signal comes
is committed and answered, what starts after it gets 503 with Retry-After, `/readyz` turns
503, and the process exits 0 within TALLY_DRAIN_SECONDS, alone and with --workers 2; a drain
that runs out of time exits 1 and says so in the log."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from tally.settings import Settings
from tests.conftest import event
from tests.e2e.test_ratelimit import Keys, register
from tests.support.raw_http import connect, read_answer, status_of
from tests.support.server import Server, running_server

DRAIN_SECONDS = 6
# With --workers the supervisor passes the signal on within its half-second poll.
SIGNAL_LATENCY = 1.5


def slow_batch_request(server: Server, key: str, events: int) -> tuple[bytes, bytes]:
    """The head and the body of a POST /v1/events carrying `events` events, to be sent apart."""
    body = json.dumps({"events": [event(f"slow-{n}") for n in range(events)]}).encode()
    head = (
        f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def request_in_flight(server: Server, keys: Keys, events: int) -> tuple[socket.socket, bytes]:
    """A connection carrying a batch whose head and first half are sent, so that the server
    is running it, waiting for the rest: the bytes left to send."""
    head, body = slow_batch_request(server, keys.writer, events)
    connection = connect(server.port)
    connection.sendall(head + body[: len(body) // 2])
    time.sleep(0.3)  # the request runs once its head is parsed: let the server start it
    return connection, body[len(body) // 2 :]


def refused_while_draining(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["connection"] == "close"
    problem = answer.json()
    assert problem["code"] == "ERR-SYS-503"
    assert "shutting down" in problem["detail"]


def wait_until_unready(server: Server) -> float:
    """Polls /readyz on new connections until it answers 503; the time it took."""
    started = time.monotonic()
    while True:
        ready = httpx.get(f"{server.base_url}/readyz", timeout=5)
        if ready.status_code == 503:
            refused_while_draining(ready)
            return time.monotonic() - started
        assert time.monotonic() - started < SIGNAL_LATENCY + 1, "/readyz stayed 200"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_answers_running_requests_refuses_new_ones_and_exits_0(
    tmp_path: Path, workers: str
) -> None:
    url = f"sqlite:///{tmp_path / 'tally.db'}"
    env = {"TALLY_DRAIN_SECONDS": str(DRAIN_SECONDS)}
    with running_server(url, tmp_path, "--workers", workers, env=env) as server:
        keys = register(server)
        with httpx.Client(base_url=server.base_url, timeout=10) as kept_alive:
            assert kept_alive.get("/healthz").status_code == 200
            connection, rest = request_in_flight(server, keys, events=1000)
            with connection:
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                assert wait_until_unready(server) < SIGNAL_LATENCY
                # New requests, on a new connection and on one kept alive since before.
                late = event("late")
                refused_while_draining(
                    httpx.post(
                        f"{server.base_url}/v1/events",
                        json=late,
                        headers={"Authorization": f"Bearer {keys.writer}"},
                        timeout=5,
                    )
                )
                refused_while_draining(kept_alive.get("/healthz"))
                time.sleep(1.0)  # the body keeps the drain waiting, not the clock
                assert server.process.poll() is None, server.logs()
                connection.sendall(rest)
                answer = read_answer(connection)
        assert status_of(answer) == 200, answer[:500]
        outcome = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert outcome["accepted"] == 1000

        code = server.process.wait(timeout=DRAIN_SECONDS + 5)
        took = time.monotonic() - signalled
        assert code == 0, f"exit {code} after a clean drain\n{server.logs()}"
        assert took < DRAIN_SECONDS, f"the drain took {took:.1f}s"
        logs = server.stderr.read_text(errors="replace")
        assert "drain_timed_out" not in logs and "Traceback" not in logs, logs

    # Everything the running request was told is stored (read from the file the server
    # left); the refused event is not.
    with closing(sqlite3.connect(tmp_path / "tally.db")) as database:
        stored = {row[0] for row in database.execute("SELECT id FROM events")}
    assert stored == {f"slow-{n}" for n in range(1000)}


def test_a_drain_that_runs_out_of_time_exits_1_and_logs_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tally.db'}"
    env = {"TALLY_DRAIN_SECONDS": "2", "TALLY_REQUEST_TIMEOUT_SECONDS": "60"}
    with running_server(url, tmp_path, env=env) as server:
        keys = register(server)
        head, body = slow_batch_request(server, keys.writer, events=10)
        with connect(server.port) as connection:
            connection.sendall(head + body[:10])  # and never the rest
            time.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                code = server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the drain was not bounded\n{server.logs()}")
            took = time.monotonic() - signalled
        assert code == 1, server.logs()
        assert 2 <= took < 5, f"the drain took {took:.1f}s"
        [timed_out] = [
            json.loads(line)
            for line in server.stderr.read_text(errors="replace").splitlines()
            if '"drain_timed_out"' in line
        ]
        assert timed_out["level"] == "error"
        assert timed_out["cancelled_requests"] == 1


def test_the_notice_keeps_the_listener_answering_503_then_it_closes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tally.db'}"
    env = {"TALLY_DRAIN_SECONDS": "5", "TALLY_DRAIN_NOTICE_SECONDS": "2"}
    with running_server(url, tmp_path, env=env) as server:
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until_unready(server)
        answers = 0
        while True:
            try:
                ready = httpx.get(f"{server.base_url}/readyz", timeout=5)
            except httpx.ConnectError:
                break
            refused_while_draining(ready)
            answers += 1
            time.sleep(0.2)
        closed = time.monotonic() - signalled
        assert 2 <= closed < 4, f"the listener closed after {closed:.1f}s"
        assert answers >= 5
        assert server.process.wait(timeout=5) == 0, server.logs()


def test_a_notice_as_long_as_the_drain_is_refused_with_what_to_set() -> None:
    with pytest.raises(ValidationError, match=r"TALLY_DRAIN_NOTICE_SECONDS .* TALLY_DRAIN_SECONDS"):
        Settings(drain_seconds=5, drain_notice_seconds=5)
