"""Real Redis for the rate-limit tests: the machine's server, and throwaway ones to kill.

No mocks: a test that needs Redis uses the server at TALLY_TEST_REDIS_URL (default
redis://127.0.0.1:6379/0) under a key prefix of its own, or starts a `redis-server` of its
own on a free port. Under CI=true a missing Redis fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.conftest import IN_CI
from tests.support.server import free_port

REDIS_URL = os.environ.get("TALLY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_TIMEOUT = 10.0


def require_redis() -> str:
    """The machine's Redis URL; skips (fails under CI=true) when it does not answer."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        if IN_CI:
            pytest.fail(f"Redis at {REDIS_URL} is unreachable under CI=true: {error}")
        pytest.skip(f"Redis at {REDIS_URL} is unreachable")
    finally:
        client.close()
    return REDIS_URL


def unique_prefix() -> str:
    return f"tally-test:{secrets.token_hex(6)}:"


def keys_under(url: str, prefix: str) -> list[str]:
    with redis.Redis.from_url(url, socket_timeout=2, decode_responses=True) as client:
        return sorted(client.scan_iter(match=f"{prefix}*"))


def delete_under(url: str, prefix: str) -> None:
    with redis.Redis.from_url(url, socket_timeout=2) as client:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


@dataclass
class ThrowawayRedis:
    """A `redis-server` of the test's own, with no persistence; `kill` and `start` it."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Raises FileNotFoundError without redis-server, RuntimeError if it does not answer."""
        log = (self.workdir / f"redis-{self.port}.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        with client:
            while time.monotonic() < deadline:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer")

    def kill(self) -> None:
        """SIGKILL: gone at once, as a crashed or unreachable Redis is."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


@contextmanager
def throwaway_redis(workdir: Path) -> Iterator[ThrowawayRedis]:
    """A started ThrowawayRedis, killed on exit; skips (fails under CI) without redis-server."""
    server = ThrowawayRedis(workdir)
    try:
        server.start()
    except FileNotFoundError as missing:
        if IN_CI:
            raise
        pytest.skip(f"redis-server is not installed: {missing}")
    try:
        yield server
    finally:
        server.kill()
