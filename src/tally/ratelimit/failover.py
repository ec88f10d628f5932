"""A shared limiter that degrades to in-process limiting while it is unreachable."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import structlog

from tally.ratelimit.interface import (
    Charge,
    Limiter,
    LimiterUnavailable,
    SharedLimiter,
    Verdict,
)

log = structlog.get_logger(__name__)

DEFAULT_RETRY_SECONDS = 2.0
_NORMAL = "normal"
_PROBE = "probe"


class FailoverLimiter:
    """Decides with `primary` (Redis) and, when it fails, with `fallback` (in-process).

    Rate limiting must never stop ingestion: when `primary` raises LimiterUnavailable the
    charge is decided by `fallback` instead, and for `retry_seconds` no request waits on
    `primary` at all; after that one request (only one) tries it again. Each outage is logged
    once, as a warning, by error type only (never the URL, which may hold a password), and its
    end once, at info. While it lasts, every process limits on its own: a client spreading its
    requests over N replicas may get up to N times its budget.
    """

    def __init__(
        self,
        primary: SharedLimiter,
        fallback: Limiter,
        *,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._down = False
        self._probing = False
        self._next_try = 0.0

    @property
    def degraded(self) -> bool:
        """True while decisions are made in-process because `primary` failed."""
        return self._down

    def shared_answers(self) -> bool:
        """Whether `primary` answers a ping now (readiness, api/health.py). It only reports:
        an outage still ends with a request's probe, as above."""
        try:
            self._primary.ping()
        except LimiterUnavailable:
            return False
        return True

    def acquire(self, charges: Sequence[Charge]) -> Verdict:
        """See Limiter.acquire; never raises LimiterUnavailable."""
        attempt = self._attempt()
        if attempt is None:
            return self._fallback.acquire(charges)
        try:
            verdict = self._primary.acquire(charges)
        except LimiterUnavailable as error:
            self._failed(str(error))
            return self._fallback.acquire(charges)
        if attempt is _PROBE:
            self._recovered()
        return verdict

    def _attempt(self) -> str | None:
        """_NORMAL while `primary` is up, _PROBE for the one retry after the back-off,
        None (use the fallback) otherwise."""
        with self._lock:
            if not self._down:
                return _NORMAL
            if self._probing or self._clock() < self._next_try:
                return None
            self._probing = True
            return _PROBE

    def _failed(self, error_type: str) -> None:
        with self._lock:
            self._probing = False
            self._next_try = self._clock() + self._retry_seconds
            if self._down:
                return
            self._down = True
        log.warning(
            "rate_limit_store_unreachable",
            error_type=error_type,
            detail="rate limits are enforced per process until the shared store answers again",
        )

    def _recovered(self) -> None:
        # Only the probe ends an outage: a request that started before the failure and
        # succeeded after it says nothing about now.
        with self._lock:
            self._down = False
            self._probing = False
        log.info("rate_limit_store_recovered")

    def close(self) -> None:
        self._primary.close()
        self._fallback.close()
