"""The limiters, in-process and on the real Redis, against one stepped clock: same decisions.

Times are asserted through the injected clock, never by sleeping. The Redis limiter takes the
clock too (in place of the server's TIME) so that both can be held to identical answers;
`test_redis_uses_the_server_clock` covers the production path without it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from tally.ratelimit.inprocess import InProcessLimiter
from tally.ratelimit.interface import Charge, Limiter, Verdict
from tally.ratelimit.redis_limiter import RedisLimiter
from tests.ratelimit.conftest import Clock
from tests.ratelimit.redis_support import keys_under

MakeLimiter = Callable[[Clock], Limiter]


@pytest.fixture(params=["in-process", "redis"])
def make_limiter(request: pytest.FixtureRequest) -> Iterator[MakeLimiter]:
    """Builds the limiter under test on a clock (several may share one Redis prefix)."""
    made: list[Limiter] = []

    def make(clock: Clock) -> Limiter:
        limiter: Limiter
        if request.param == "in-process":
            limiter = InProcessLimiter(clock=clock)
        else:
            url = request.getfixturevalue("redis_url")
            prefix = request.getfixturevalue("redis_prefix")
            limiter = RedisLimiter(url, prefix=prefix, timeout=2.0, clock=clock)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        limiter.close()


def one(limiter: Limiter, bucket: str, cost: int, rate: int, burst: int) -> Verdict:
    return limiter.acquire([Charge(bucket=bucket, cost=cost, rate=rate, burst=burst)])


def test_a_full_bucket_allows_its_burst_then_refuses(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Clock())
    answers = [one(limiter, "b", 1, 2, 5).decisions[0] for _ in range(6)]

    assert [a.allowed for a in answers] == [True] * 5 + [False]
    assert [a.remaining for a in answers] == [4, 3, 2, 1, 0, 0]
    assert {a.limit for a in answers} == {5}
    # 5 units at 2 a second: full again 2.5 s after the first; one more fits after 0.5 s.
    assert answers[4].reset == 3
    assert answers[5].retry_after == 1
    assert answers[5].reset == 3
    assert [a.retry_after for a in answers[:5]] == [0] * 5


def test_the_bucket_refills_at_the_rate(make_limiter: MakeLimiter) -> None:
    clock = Clock()
    limiter = make_limiter(clock)
    for _ in range(3):
        assert one(limiter, "b", 1, 3, 3).allowed
    assert not one(limiter, "b", 1, 3, 3).allowed

    # One unit takes exactly 1/3 s = 333,333.33 µs: not yet at 333,333, yes at 333,334. An
    # emission interval rounded to whole microseconds would let it through early.
    clock.advance(micros=333_333)
    assert not one(limiter, "b", 1, 3, 3).allowed
    clock.advance(micros=1)
    assert one(limiter, "b", 1, 3, 3).allowed
    assert not one(limiter, "b", 1, 3, 3).allowed

    # No drift: a thousand seconds later it is full again, and in each second after that it
    # gives exactly 3, never a 4th.
    clock.advance(1000)
    for _ in range(200):
        assert all(one(limiter, "b", 1, 3, 3).allowed for _ in range(3))
        assert not one(limiter, "b", 1, 3, 3).allowed
        clock.advance(1)


def test_costs_remaining_reset_and_retry_after(make_limiter: MakeLimiter) -> None:
    clock = Clock()
    limiter = make_limiter(clock)
    taken = [one(limiter, "events", 30, 10, 100).decisions[0] for _ in range(3)]
    assert [d.remaining for d in taken] == [70, 40, 10]
    assert [d.reset for d in taken] == [3, 6, 9]

    refused = one(limiter, "events", 30, 10, 100).decisions[0]
    assert not refused.allowed
    assert refused.remaining == 10  # nothing was taken
    assert refused.reset == 9
    assert refused.retry_after == 2  # 20 more units at 10 a second

    clock.advance(1.999)
    assert not one(limiter, "events", 30, 10, 100).allowed
    clock.advance(0.001)
    assert one(limiter, "events", 30, 10, 100).decisions[0].remaining == 0


def test_a_cost_above_the_burst_never_passes_and_takes_nothing(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter(Clock())
    refused = one(limiter, "b", 6, 1, 5).decisions[0]
    assert not refused.allowed
    assert refused.retry_after >= 1
    assert one(limiter, "b", 5, 1, 5).allowed  # the bucket is still full


def test_one_acquire_takes_every_bucket_or_none(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Clock())
    wide, narrow = Charge("wide", 1, 1, 5), Charge("narrow", 1, 1, 1)
    assert limiter.acquire([wide, narrow]).allowed

    refused = limiter.acquire([wide, narrow])
    assert not refused.allowed
    tightest = refused.tightest()
    assert tightest is not None
    assert tightest.bucket == "narrow"
    # "wide" was not charged by the refused acquire: 4 units are still there.
    assert one(limiter, "wide", 4, 1, 5).allowed


def test_redis_and_in_process_decide_alike(redis_url: str, redis_prefix: str) -> None:
    clock = Clock()
    local = InProcessLimiter(clock=clock)
    shared = RedisLimiter(redis_url, prefix=redis_prefix, timeout=2.0, clock=clock)
    chance = random.Random(20261125)
    buckets = [("a", 1, 1), ("b", 7, 20), ("c", 1000, 5000), ("d", 3, 1_000_000)]
    try:
        for _ in range(600):
            clock.advance(micros=chance.choice([0, 1, 999, 142_857, 333_334, 2_000_000]))
            picked = chance.sample(buckets, chance.randint(1, 3))
            charges = [
                Charge(name, chance.randint(1, max(1, burst // 3)), rate, burst)
                for name, rate, burst in picked
            ]
            assert shared.acquire(charges) == local.acquire(charges)
    finally:
        shared.close()


def test_concurrent_callers_never_get_more_than_the_budget(make_limiter: MakeLimiter) -> None:
    clock = Clock()  # frozen: the budget is exactly the burst
    limiter = make_limiter(clock)
    allowed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def hammer() -> None:
        mine = 0
        start.wait()
        for _ in range(40):
            if one(limiter, "hot", 1, 1, 100).allowed:
                mine += 1
        with lock:
            allowed.append(mine)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(allowed) == 8
    assert sum(allowed) == 100  # 320 attempts, a budget of 100


def test_in_process_memory_stays_bounded() -> None:
    clock = Clock()
    limiter = InProcessLimiter(clock=clock, max_buckets=1000)
    for n in range(50_000):
        one(limiter, f"key:{n}:requests", 1, 1, 10)
    assert len(limiter) <= 1000

    # Idle buckets go as soon as they are full again: one more call sweeps them all.
    clock.advance(11)
    one(limiter, "someone-new", 1, 1, 10)
    assert len(limiter) == 1


def test_in_process_evicts_the_least_recently_used_first() -> None:
    clock = Clock()
    limiter = InProcessLimiter(clock=clock, max_buckets=3)
    for name in ("a", "b", "c"):
        one(limiter, name, 1, 1, 2)
    one(limiter, "a", 1, 1, 2)  # a is now the most recent
    one(limiter, "d", 1, 1, 2)  # evicts b
    assert not one(limiter, "a", 1, 1, 2).allowed  # a kept its debt
    assert one(limiter, "b", 2, 1, 2).allowed  # b was forgotten: full again


def test_redis_keys_expire_when_their_bucket_is_full_again(
    redis_url: str, redis_prefix: str
) -> None:
    clock = Clock()
    limiter = RedisLimiter(redis_url, prefix=redis_prefix, timeout=2.0, clock=clock)
    try:
        one(limiter, "ttl", 30, 10, 100)  # full again in 3 s
        [key] = keys_under(redis_url, redis_prefix)
        with redis.Redis.from_url(redis_url) as client:
            ttl = client.pttl(key)
        assert 0 < ttl <= 3001
        assert key == f"{redis_prefix}ttl"
    finally:
        limiter.close()


def test_redis_uses_the_server_clock(redis_url: str, redis_prefix: str) -> None:
    # Without an injected clock, "now" is Redis's TIME (the epoch), not this process's
    # monotonic clock: every replica, whatever its own clock says, shares Redis's.
    limiter = RedisLimiter(redis_url, prefix=redis_prefix, timeout=2.0)
    try:
        assert one(limiter, "server-time", 1000, 1, 1000).allowed  # full again in 1000 s
        with redis.Redis.from_url(redis_url, decode_responses=True) as client:
            seconds, micros = client.time()
            stored = client.get(f"{redis_prefix}server-time")
        assert stored is not None
        tat = int(stored.split(":")[0])
        ahead = tat - (seconds * 1_000_000 + micros)
        assert 900_000_000 < ahead <= 1_000_000_000
        later = one(limiter, "server-time", 1, 1, 1000).decisions[0]
        assert 900 < later.reset <= 1001
    finally:
        limiter.close()


def test_buckets_in_one_acquire_must_differ() -> None:
    limiter = InProcessLimiter()
    with pytest.raises(ValueError, match="once"):
        limiter.acquire([Charge("same", 1, 1, 1), Charge("same", 1, 1, 1)])
