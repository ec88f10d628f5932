"""Copies of registry rows a process may answer from, for a bounded time.

Every ingest request needs its key's record and its tenants' settings and data keys. Reading
them from the store per request cost two round trips and a pooled connection each, which
bounded ingestion more than the commit did. A `FreshCache` keeps what was read for at most
`Freshness.seconds` (TALLY_CACHE_SECONDS): a change made by another process (a revocation
through another replica or worker, `tally keys revoke` on the host) is seen within that bound.
A change made through this process (`Registry`) bumps `Freshness` at once, so this process
never answers from a copy older than its own last change.

What is never cached: an absent row (a key or tenant registered a moment ago is found on the
next request), and a key's expiry, which is judged against the clock on every request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_SECONDS = 1.0
MAX_ENTRIES = 100_000


class Freshness:
    """How old a cached copy may be, and this process's generation of registry changes."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.generation = 0
        self._lock = threading.Lock()

    def changed(self) -> None:
        """A registry row changed through this process: every copy taken before is stale."""
        with self._lock:
            self.generation += 1


class FreshCache(Generic[K, V]):
    """Values by key, each answered for `freshness.seconds` after it was read and only while
    no change went through this process since. Without a lock: dict reads and writes are
    atomic, and a race only costs a read from the store."""

    def __init__(self, freshness: Freshness, *, max_entries: int = MAX_ENTRIES) -> None:
        self._freshness = freshness
        self._max_entries = max_entries
        self._entries: dict[K, tuple[float, int, V]] = {}

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is None:
            return None
        read_at, generation, value = found
        freshness = self._freshness
        if generation != freshness.generation or freshness.clock() - read_at >= freshness.seconds:
            self._entries.pop(key, None)
            return None
        return value

    def put(self, key: K, value: V, *, read_at: float, generation: int) -> None:
        """Keep `value`, read from the store at `read_at` (`freshness.clock()` taken before the
        read) when `freshness.generation` was `generation`: a change that raced the read makes
        the copy stale at once."""
        if self._freshness.seconds <= 0:
            return
        if len(self._entries) >= self._max_entries:  # rare: more live rows than it holds
            self._entries.clear()
        self._entries[key] = (read_at, generation, value)

    def stamp(self) -> tuple[float, int]:
        """(read_at, generation) to pass to `put` for a read starting now."""
        return self._freshness.clock(), self._freshness.generation
