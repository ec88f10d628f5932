"""Fixtures for the rate-limit tests: a stepped clock, Redis prefixes, limited apps.

The API tests here run on an SQLite file only: rate limiting does not touch the store. Their
settings come from the `limits` marker (`@pytest.mark.limits(rate_key_requests_per_second=1)`),
and their limiter runs on the test's `clock`, which moves only when the test says.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tally.bootstrap import Services, build
from tally.ratelimit.inprocess import InProcessLimiter
from tally.settings import Settings
from tally.store.interface import EventStore
from tests.ratelimit.redis_support import delete_under, require_redis, unique_prefix


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "limits(**settings): Settings fields of the test's app")


class Clock:
    """Microseconds that move only when told to (an arbitrary, epoch-like start)."""

    def __init__(self, start: int = 1_800_000_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float = 0, *, micros: int = 0) -> None:
        self.now += round(seconds * 1_000_000) + micros


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return require_redis()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own on the real Redis, emptied afterwards."""
    prefix = unique_prefix()
    yield prefix
    delete_under(redis_url, prefix)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tally.db'}"


@pytest.fixture
def settings(database_url: str, request: pytest.FixtureRequest) -> Settings:
    marker = request.node.get_closest_marker("limits")
    limits = marker.kwargs if marker is not None else {}
    return Settings(database_url=database_url, region="eu-west", **limits)


@pytest.fixture
def services(settings: Settings, store: EventStore, clock: Clock) -> Iterator[Services]:
    built = build(settings, store=store, limiter=InProcessLimiter(clock=clock))
    yield built
    built.committer.close()
