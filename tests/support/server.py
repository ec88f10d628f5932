"""A real `tally serve` process on a free 127.0.0.1 port: for end-to-end tests and bench/.

No pytest here, so the benchmark harness can use it too. The server prints everything before
uvicorn starts, so once /readyz answers its stdout is complete. Its stdout is not a terminal,
so a server on a new store does not print its first admin key there: it writes the key to an
owner-only file and prints that file's path, which `first_admin_key` follows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tally.crypto import keyring as keyrings

TALLY = Path(sys.executable).parent / "tally"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
_ADMIN_KEY = re.compile(r"^\s*(tly_[A-Za-z0-9_-]+)\s*$", re.MULTILINE)
# The path line `tally serve` prints (cli/main.py names the file tally-admin-key-<random>).
_ADMIN_KEY_FILE = re.compile(r"^\s*(/\S*/tally-admin-key-[0-9a-f]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Server:
    base_url: str
    port: int
    admin_key: str  # "" when the server issued none (the store had keys already)
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    # With TLS: the client context that trusts the server (and holds a client certificate
    # when the server requires one); base_url is then https.
    tls: ssl.SSLContext | None = None

    def client(self, **options: Any) -> httpx.Client:
        """An HTTP client for this server (trusting its certificate when it has one)."""
        return httpx.Client(base_url=self.base_url, verify=self.tls or True, **options)

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


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM (the server drains and commits), then SIGKILL; False if it had to be killed."""
    if process.poll() is not None:
        return True
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
        return False
    return True


def admin_key_file(stdout: str) -> Path | None:
    """The file `tally serve` named (plain or --json) for its first admin key, if any."""
    for line in stdout.splitlines():
        if line.startswith("{"):
            named = json.loads(line).get("key_file")
            if isinstance(named, str):
                return Path(named)
    found = _ADMIN_KEY_FILE.search(stdout)
    return Path(found.group(1)) if found else None


def first_admin_key(stdout: str) -> str | None:
    """The first admin key `tally serve` issued: read from the file it named, or as printed
    (on a terminal); None when it issued none."""
    named = admin_key_file(stdout)
    if named is not None:
        return named.read_text().strip()
    for line in stdout.splitlines():
        if line.startswith("{"):
            key = json.loads(line).get("key")
            if isinstance(key, str):
                return key
    found = _ADMIN_KEY.search(stdout)
    return found.group(1) if found else None


def _wait_until_ready(
    process: subprocess.Popen[bytes], base_url: str, tls: ssl.SSLContext | None = None
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tally serve exited with {process.returncode}")
        try:
            ready = httpx.get(f"{base_url}/readyz", timeout=1.0, verify=tls or True)
            if ready.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"tally serve was not ready within {START_TIMEOUT:.0f}s")


def tally_environment(
    database_url: str, workdir: Path, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a `tally` command over `database_url`: this process's without
    its TALLY_* variables, the store's URL, then `env`. A PostgreSQL store needs a named
    keyring: every command of one workdir shares `workdir/tally.keyring`, made on first use."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TALLY_")}
    environment |= {"TALLY_DATABASE_URL": database_url, "TALLY_LOG_LEVEL": "warning"}
    environment |= env or {}
    if "TALLY_KEYRING" not in environment and not database_url.startswith("sqlite:"):
        keyring = workdir / "tally.keyring"
        if not keyring.exists():
            keyrings.generate(keyring)
        environment["TALLY_KEYRING"] = str(keyring)
    return environment


def run_tally(
    database_url: str,
    workdir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`tally <args>` (an operator's command) with the settings `running_server` gives a
    server of the same `database_url` and `workdir`; bounded in time, not checked."""
    return subprocess.run(
        [str(TALLY), *args],
        env=tally_environment(database_url, workdir, env),
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def running_server(
    database_url: str,
    workdir: Path,
    *options: str,
    env: Mapping[str, str] | None = None,
    label: str | None = None,
    tls: ssl.SSLContext | None = None,
    port: int | None = None,
) -> Iterator[Server]:
    """`tally serve` over `database_url`, output in `workdir`, stopped on exit; `options`
    and `env` go to the server. With `tls` (a client context: pass the server its certificate
    in `options` or `env`) the server is reached over https. `port`: a given one (to restart
    a server where its clients expect it), else a free one.

    Raises RuntimeError, with the server's output, when it does not become ready.
    """
    port = port or free_port()
    base_url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    environment = tally_environment(database_url, workdir, env)
    run = label or f"serve-{port}"
    stdout, stderr = workdir / f"{run}.stdout", workdir / f"{run}.stderr"
    command = [str(TALLY), "serve", "--host", "127.0.0.1", "--port", str(port), *options]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            command, env=environment, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir
        )
    try:
        try:
            _wait_until_ready(process, base_url, tls)
        except RuntimeError as error:
            stop(process)
            logs = Server(base_url, port, "", process, stdout, stderr, tls).logs()
            raise RuntimeError(f"{error}\n{logs}") from None
        admin_key = first_admin_key(stdout.read_text(errors="replace")) or ""
        yield Server(base_url, port, admin_key, process, stdout, stderr, tls)
    finally:
        stop(process)
