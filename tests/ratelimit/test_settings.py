"""The rate-limit settings: refused at start-up when a limit could never be met."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from tally.ratelimit.policy import Rate, RatePolicy
from tally.settings import Settings


def test_an_events_burst_below_the_largest_batch_is_refused_with_what_to_set() -> None:
    with pytest.raises(ValidationError, match="TALLY_RATE_TENANT_EVENTS_BURST") as refused:
        Settings(rate_tenant_events_per_second=10, rate_tenant_events_burst=999)
    assert "TALLY_MAX_BATCH_EVENTS" in str(refused.value)


def test_bursts_default_to_a_second_and_to_a_full_batch_for_events() -> None:
    settings = Settings(
        max_batch_events=500,
        rate_key_requests_per_second=7,
        rate_key_events_per_second=10,
        rate_tenant_events_per_second=2000,
        rate_tenant_requests_per_second=0,
    )
    assert RatePolicy.from_settings(settings) == RatePolicy(
        key_requests=Rate(7, 7),
        key_events=Rate(10, 500),
        tenant_requests=None,
        tenant_events=Rate(2000, 2000),
    )


def test_the_redis_url_must_be_a_redis_url() -> None:
    with pytest.raises(ValidationError, match="TALLY_REDIS_URL"):
        Settings(redis_url="http://127.0.0.1:6379")
    assert Settings(redis_url="redis://127.0.0.1:6379/0").redis_url == "redis://127.0.0.1:6379/0"


def test_the_defaults_are_generous(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TALLY_RATE_"):
            monkeypatch.delenv(name)
    policy = RatePolicy.from_settings(Settings())
    assert policy.key_requests == Rate(10_000, 10_000)
    assert policy.key_events == Rate(100_000, 100_000)
    assert policy.tenant_requests == Rate(10_000, 10_000)
    assert policy.tenant_events == Rate(100_000, 100_000)
