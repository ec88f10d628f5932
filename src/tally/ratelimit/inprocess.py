"""The in-process limiter: one process's buckets in a bounded, thread-safe map."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from tally.ratelimit.interface import Charge, Verdict, check_distinct, debt_of, judge, stored

DEFAULT_MAX_BUCKETS = 100_000


def monotonic_micros() -> int:
    return time.monotonic_ns() // 1000


class InProcessLimiter:
    """GCRA buckets in this process's memory.

    Memory is bounded: a bucket whose TAT has passed is full, the same as no bucket, so it is
    dropped; and beyond `max_buckets` the least recently used bucket is dropped even if it still
    holds debt (it then forgets that debt, which errs towards allowing). Buckets are kept in
    least-recently-used order, so each acquire sweeps expired ones from the front in amortised
    constant time: millions of distinct keys cannot grow the map past `max_buckets`.

    `clock` gives microseconds on a monotonic scale (tests pass their own).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], int] = monotonic_micros,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, charges: Sequence[Charge]) -> Verdict:
        """See Limiter.acquire; never raises LimiterUnavailable."""
        check_distinct(charges)
        buckets = self._buckets
        with self._lock:
            now = self._clock()
            judged = []
            allowed = True
            for charge in charges:
                state = buckets.get(charge.bucket)
                debt = 0 if state is None else debt_of(*state, now=now, rate=charge.rate)
                decision, after = judge(charge, debt)
                allowed = allowed and decision.allowed
                judged.append((charge, decision, after))
            if allowed:
                for charge, _, debt in judged:
                    buckets[charge.bucket] = stored(debt, now=now, rate=charge.rate)
                    buckets.move_to_end(charge.bucket)
            self._sweep(now)
            return Verdict(tuple([decision for _, decision, _ in judged]), allowed)

    def _sweep(self, now: int) -> None:
        buckets = self._buckets
        while buckets:
            bucket, (tat, _) = next(iter(buckets.items()))
            # A bucket whose TAT has passed is full again, as good as absent; beyond the
            # bound, the least recently used goes regardless.
            if tat < now or len(buckets) > self._max_buckets:
                del buckets[bucket]
            else:
                return

    def close(self) -> None:
        with self._lock:
            self._buckets.clear()
