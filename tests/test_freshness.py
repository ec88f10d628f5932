"""Fresh copies (freshness.py): answered for at most the bound, dropped by a change through
this process, never kept with the bound at 0, and bounded in number."""

from __future__ import annotations

from tally.freshness import FreshCache, Freshness


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_copy_is_answered_within_the_bound_and_not_after() -> None:
    clock = Clock()
    cache: FreshCache[str, int] = FreshCache(Freshness(1.0, clock=clock))
    read_at, generation = cache.stamp()
    cache.put("k", 1, read_at=read_at, generation=generation)
    clock.now += 0.99
    assert cache.get("k") == 1
    clock.now += 0.01
    assert cache.get("k") is None
    assert cache.get("never") is None


def test_a_change_through_this_process_drops_every_copy_even_one_read_before_it() -> None:
    clock = Clock()
    freshness = Freshness(60.0, clock=clock)
    cache: FreshCache[str, int] = FreshCache(freshness)
    cache.put("k", 1, read_at=clock(), generation=freshness.generation)
    read_at, generation = cache.stamp()  # a read that races the change below
    freshness.changed()
    assert cache.get("k") is None
    cache.put("raced", 2, read_at=read_at, generation=generation)
    assert cache.get("raced") is None  # taken before the change: stale at once
    cache.put("after", 3, read_at=clock(), generation=freshness.generation)
    assert cache.get("after") == 3


def test_with_the_bound_at_zero_nothing_is_kept() -> None:
    cache: FreshCache[str, int] = FreshCache(Freshness(0))
    read_at, generation = cache.stamp()
    cache.put("k", 1, read_at=read_at, generation=generation)
    assert cache.get("k") is None


def test_the_number_of_copies_is_bounded() -> None:
    clock = Clock()
    cache: FreshCache[int, int] = FreshCache(Freshness(60.0, clock=clock), max_entries=3)
    for key in range(10):
        cache.put(key, key, read_at=clock(), generation=0)
    assert len(cache._entries) <= 3
    assert cache.get(9) == 9
