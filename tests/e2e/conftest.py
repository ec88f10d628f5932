"""A real `tally serve` process for end-to-end tests, on the test's own store.

`database_url` (tests/conftest.py) is a fresh SQLite file or an emptied PostgreSQL database, so
the server finds no key and prints a first admin key, which `tally_server` reads from its stdout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

TALLY = Path(sys.executable).parent / "tally"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_ADMIN_KEY = re.compile(r"^\s*(tly_[A-Za-z0-9_-]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Server:
    base_url: str
    port: int
    admin_key: str
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def logs(self) -> str:
        return (
            f"--- stdout ---\n{self.stdout.read_text(errors='replace')}\n"
            f"--- stderr ---\n{self.stderr.read_text(errors='replace')}"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains), then SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


def _wait_until_ready(process: subprocess.Popen[bytes], base_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tally serve exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("tally serve did not become ready in time")


def printed_admin_key(stdout: str) -> str | None:
    """The admin key `tally serve` printed (plain or --json), None when it printed none."""
    for line in stdout.splitlines():
        if line.startswith("{"):
            key = json.loads(line).get("key")
            if isinstance(key, str):
                return key
    found = _ADMIN_KEY.search(stdout)
    return found.group(1) if found else None


@contextmanager
def running_server(database_url: str, workdir: Path, *options: str) -> Iterator[Server]:
    """`tally serve` on a free port of 127.0.0.1 over `database_url`, stopped on exit.

    The server has printed everything before uvicorn starts, so once /readyz answers, its
    stdout holds the admin key if it printed one (`admin_key` is "" otherwise).
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "TALLY_DATABASE_URL": database_url,
        "TALLY_REGION": "local",
        "TALLY_LOG_LEVEL": "warning",
    }
    run = f"serve-{port}"
    stdout = workdir / f"{run}.stdout"
    stderr = workdir / f"{run}.stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [str(TALLY), "serve", "--host", "127.0.0.1", "--port", str(port), *options],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=workdir,
        )
    try:
        try:
            _wait_until_ready(process, base_url)
        except RuntimeError as error:
            stop(process)
            logs = Server(base_url, port, "", process, stdout, stderr).logs()
            pytest.fail(f"{error}\n{logs}")
        admin_key = printed_admin_key(stdout.read_text(errors="replace")) or ""
        yield Server(base_url, port, admin_key, process, stdout, stderr)
    finally:
        stop(process)


@pytest.fixture
def tally_server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    """`tally serve` over the test's (empty) store, with the admin key it printed."""
    with running_server(database_url, tmp_path) as server:
        assert server.admin_key, f"no admin key printed\n{server.logs()}"
        yield server
