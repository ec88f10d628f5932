"""The limiter contract and its arithmetic: GCRA in exact integers.

GCRA (the generic cell rate algorithm) keeps one number per bucket, the theoretical arrival time
(TAT): when the bucket would be full again. A charge of `cost` units moves it `cost / rate`
seconds later; it is refused when that would put the TAT more than `burst / rate` seconds ahead
of now. There is no refill loop, so nothing accumulates and nothing drifts.

Everything is an integer. Times are microseconds; a TAT is kept as `tat + frac / rate`
microseconds (0 <= frac < rate), so `1 / rate` of a second is exact for every integer rate. The
work is done on the *debt* `(TAT - now) * rate` (microseconds times rate): one unit costs
exactly 1,000,000, a full burst is `burst * 1,000,000`. With rate <= 10**6, burst <= 10**9 and
cost <= burst, every figure stays below 2**53, so Redis's Lua (whose numbers are doubles)
computes the same decisions as Python does here (redis_limiter.py mirrors this module).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

MICROS = 1_000_000
MAX_RATE = 10**6
MAX_BURST = 10**9


class LimiterUnavailable(Exception):
    """A shared limiter (Redis) could not decide: unreachable, timed out or refusing."""


# Not frozen, like the decisions below: a frozen dataclass sets each field through
# object.__setattr__, and every request makes several. Treated as immutable all the same.
@dataclass(slots=True)
class Charge:
    """`cost` units against `bucket`, which holds `burst` units and refills `rate` a second."""

    bucket: str
    cost: int
    rate: int
    burst: int

    def __post_init__(self) -> None:
        if not (1 <= self.rate <= MAX_RATE and 1 <= self.burst <= MAX_BURST and self.cost >= 0):
            raise ValueError("a charge needs 1 <= rate <= 10**6, 1 <= burst <= 10**9, cost >= 0")


@dataclass(slots=True)
class Decision:
    """One bucket's answer, as the RateLimit fields state it.

    `allowed`: this charge fits (the verdict still refuses if another bucket's does not).
    `limit` is the burst; `remaining` the units left and `reset` the seconds until the bucket
    is full again, counting this charge when it fits and not when it does not; `retry_after`
    the seconds until this charge could fit (0 when it fits now).
    """

    bucket: str
    allowed: bool
    limit: int
    remaining: int
    reset: int
    retry_after: int


@dataclass(slots=True)
class Verdict:
    """The answer to one `acquire`: allowed only if every bucket allowed its charge."""

    decisions: tuple[Decision, ...]
    allowed: bool

    @classmethod
    def of(cls, decisions: tuple[Decision, ...]) -> Verdict:
        return cls(decisions, all(decision.allowed for decision in decisions))

    def tightest(self) -> Decision | None:
        """The refusal that lasts longest; if none, the bucket with the fewest units left."""
        return max(self.decisions, key=tightness, default=None)


def tightness(decision: Decision) -> tuple[int, int, int]:
    """Orders decisions from loosest to tightest: any refusal is tighter than any allowance;
    a longer wait, or fewer units left, is tighter; then a later reset."""
    if decision.allowed:
        return (0, -decision.remaining, decision.reset)
    return (1, decision.retry_after, decision.reset)


class Limiter(Protocol):
    def acquire(self, charges: Sequence[Charge]) -> Verdict:
        """Decide every charge atomically: take them all, or (refused) take none.

        Buckets must be distinct within one call (ValueError otherwise). Raises
        LimiterUnavailable when a shared limiter cannot decide.
        """
        ...

    def close(self) -> None:
        """Release connections; the limiter is not used afterwards."""
        ...


class SharedLimiter(Limiter, Protocol):
    """A limiter kept outside the process (Redis), shared by every worker and replica."""

    def ping(self) -> None:
        """One round trip; raises LimiterUnavailable when it does not answer."""
        ...


def check_distinct(charges: Sequence[Charge]) -> None:
    """Raises ValueError when two charges name one bucket (they would be judged apart)."""
    if len({charge.bucket for charge in charges}) != len(charges):
        raise ValueError("each bucket may be charged once per acquire")


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def debt_of(tat: int, frac: int, *, now: int, rate: int) -> int:
    """(TAT - now) * rate of a stored bucket; 0 once the TAT has passed (the bucket is full)."""
    if tat < now:
        return 0
    return (tat - now) * rate + min(frac, rate - 1)


def judge(charge: Charge, debt: int) -> tuple[Decision, int]:
    """The decision on `charge` for a bucket holding `debt`, and the debt if it is taken."""
    capacity = charge.burst * MICROS
    per_second = charge.rate * MICROS
    after = debt + charge.cost * MICROS
    if after <= capacity:
        decision = Decision(
            bucket=charge.bucket,
            allowed=True,
            limit=charge.burst,
            remaining=(capacity - after) // MICROS,
            reset=ceil_div(after, per_second),
            retry_after=0,
        )
        return decision, after
    if charge.cost > charge.burst:
        # It can never pass; the earliest sensible retry is a full bucket.
        wait = ceil_div(debt, per_second)
    else:
        wait = ceil_div(after - capacity, per_second)
    decision = Decision(
        bucket=charge.bucket,
        allowed=False,
        limit=charge.burst,
        remaining=max(0, capacity - debt) // MICROS,
        reset=ceil_div(debt, per_second),
        retry_after=max(1, wait),
    )
    return decision, debt


def stored(debt: int, *, now: int, rate: int) -> tuple[int, int]:
    """(tat, frac) that encode `debt` at `now`."""
    whole, frac = divmod(debt, rate)
    return now + whole, frac
