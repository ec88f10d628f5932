"""Redis going away: decisions continue in-process, one warning per outage, then recovery.

Real redis-server processes, killed and restarted; a real socket that never answers.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tally.ratelimit.failover import FailoverLimiter
from tally.ratelimit.inprocess import InProcessLimiter
from tally.ratelimit.interface import Charge, LimiterUnavailable, Verdict
from tally.ratelimit.redis_limiter import RedisLimiter
from tests.ratelimit.redis_support import ThrowawayRedis, keys_under, throwaway_redis

CHARGE = [Charge("key:k:requests", 1, 1, 1000)]


class Counted:
    """The real RedisLimiter, counting how often it is asked."""

    def __init__(self, inner: RedisLimiter) -> None:
        self.inner = inner
        self.calls = 0

    def acquire(self, charges: Sequence[Charge]) -> Verdict:
        self.calls += 1
        return self.inner.acquire(charges)

    def close(self) -> None:
        self.inner.close()


class Seconds:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    with throwaway_redis(tmp_path) as server:
        yield server


def warnings_of(logs: list[dict[str, object]], event: str) -> list[dict[str, object]]:
    return [entry for entry in logs if entry["event"] == event]


def test_an_outage_falls_back_in_process_with_one_warning_then_recovers(
    redis_server: ThrowawayRedis,
) -> None:
    seconds = Seconds()
    primary = Counted(RedisLimiter(redis_server.url, prefix="t:", timeout=0.5))
    limiter = FailoverLimiter(primary, InProcessLimiter(), retry_seconds=2.0, clock=seconds)
    with capture_logs() as logs:
        assert limiter.acquire(CHARGE).allowed
        assert keys_under(redis_server.url, "t:") == ["t:key:k:requests"]

        redis_server.kill()
        answers = [limiter.acquire(CHARGE) for _ in range(50)]
        assert all(verdict.allowed for verdict in answers)  # ingestion keeps going
        assert limiter.degraded
        assert primary.calls == 2  # during the back-off nobody waits on the dead Redis

        # After the back-off one caller probes; it fails again, still one warning.
        seconds.now += 2.0
        assert limiter.acquire(CHARGE).allowed
        assert primary.calls == 3
        assert limiter.acquire(CHARGE).allowed
        assert primary.calls == 3

        redis_server.start()  # same port, empty
        seconds.now += 2.0
        assert limiter.acquire(CHARGE).allowed
        assert not limiter.degraded
        assert keys_under(redis_server.url, "t:") == ["t:key:k:requests"]

    unreachable = warnings_of(logs, "rate_limit_store_unreachable")
    assert len(unreachable) == 1
    assert unreachable[0]["log_level"] == "warning"
    assert "redis://" not in str(unreachable[0])
    assert len(warnings_of(logs, "rate_limit_store_recovered")) == 1
    limiter.close()


def test_the_fallback_still_limits() -> None:
    port = _closed_port()
    primary = RedisLimiter(f"redis://127.0.0.1:{port}/0", prefix="t:", timeout=0.5)
    limiter = FailoverLimiter(primary, InProcessLimiter())
    tight = [Charge("key:k:requests", 1, 1, 3)]
    assert [limiter.acquire(tight).allowed for _ in range(4)] == [True, True, True, False]
    limiter.close()


def test_many_threads_failing_at_once_log_one_warning() -> None:
    port = _closed_port()
    primary = RedisLimiter(f"redis://127.0.0.1:{port}/0", prefix="t:", timeout=0.5)
    limiter = FailoverLimiter(primary, InProcessLimiter())
    start = threading.Barrier(16)
    answers: list[bool] = []

    def call() -> None:
        start.wait()
        answers.append(limiter.acquire(CHARGE).allowed)

    with capture_logs() as logs:
        threads = [threading.Thread(target=call) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert answers == [True] * 16
    assert len(warnings_of(logs, "rate_limit_store_unreachable")) == 1
    limiter.close()


def test_a_redis_that_never_answers_costs_a_request_only_the_timeout() -> None:
    # A listening socket that never replies: the connection succeeds, the reply never comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        limiter = RedisLimiter(url, prefix="t:", timeout=0.2)
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            limiter.acquire(CHARGE)
        # redis-py's defaults (5 s timeouts, 3 retries with back-off) would take far longer.
        assert time.monotonic() - started < 3.0
        guarded = FailoverLimiter(limiter, InProcessLimiter())
        assert guarded.acquire(CHARGE).allowed
        guarded.close()


def _closed_port() -> int:
    """A port on which nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
