"""HTTP to one of several Tally base URLs: retries with backoff, Retry-After, failover."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from tally.client.errors import TallyError, error_of

log = logging.getLogger("tally.client")

# Tally answers these when nothing was done and a later attempt may succeed: a proxy's or the
# server's timeout, a rate limit, a server starting, draining or failing.
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# Statuses after which a request that is not idempotent may be repeated: Tally states that a
# 429 and a 503 did nothing.
NOTHING_DONE = frozenset({429, 503})

Sleep = Callable[[float], bool]


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a request is tried.

    `deadline`: seconds from the first attempt (for a reported event: from its `report`)
    after which no new attempt starts; `max_retries`: at most this many attempts after the
    first (None: as many as the deadline allows). Backoff is exponential with full jitter:
    attempt n waits a uniform random time in [0, min(cap, base * 2**n)], or at least the
    answer's Retry-After."""

    deadline: float = 60.0
    max_retries: int | None = None
    backoff_base: float = 0.1
    backoff_cap: float = 10.0

    def backoff(self, retry: int) -> float:
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** min(retry, 60))
        return random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not a secret


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def problem_of(response: httpx.Response) -> dict[str, Any]:
    """The response's problem document, or one written from its status and text."""
    try:
        parsed = response.json()
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    return {
        "status": response.status_code,
        "title": response.reason_phrase or f"HTTP {response.status_code}",
        "detail": response.text[:500],
    }


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def unreachable(error: Exception, url: str) -> TallyError:
    return TallyError(
        None,
        {"title": "Tally could not be reached", "detail": f"{type(error).__name__} at {url}"},
    )


class Transport:
    """Requests to Tally through one httpx client, on the base URL that answered last.

    A connection error, a timeout or a 5xx moves on to the next base URL (round-robin); the
    one that answers stays in use. A round over every URL without an answer waits its backoff
    before the next. Thread-safe.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        key: str,
        *,
        timeout: float,
        verify: bool | str | Any,
        transport: httpx.BaseTransport | None,
    ) -> None:
        if not base_urls:
            raise ValueError("give at least one base URL")
        self.base_urls = tuple(url.rstrip("/") for url in base_urls)
        self._current = 0
        self._lock = threading.Lock()
        # The key lives only in this header; httpx masks Authorization in its reprs.
        self._http = httpx.Client(
            headers={"Authorization": f"Bearer {key}", "User-Agent": "tally-client"},
            timeout=timeout,
            verify=verify,
            transport=transport,
        )

    @property
    def active_base_url(self) -> str:
        """The base URL the next request goes to: the last one that answered."""
        with self._lock:
            return self.base_urls[self._current]

    def close(self) -> None:
        self._http.close()

    def _pick(self) -> int:
        with self._lock:
            return self._current

    def _fail_over(self, used: int) -> None:
        with self._lock:
            if self._current == used:
                self._current = (used + 1) % len(self.base_urls)
                chosen = self.base_urls[self._current]
                log.warning(
                    "tally_client_failover",
                    extra={"from_url": self.base_urls[used], "to_url": chosen},
                )

    def request(
        self,
        method: str,
        path: str,
        *,
        policy: RetryPolicy,
        params: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
        stream: bool = False,
        sleep: Sleep = _sleep,
        give_up_at: float | None = None,
    ) -> httpx.Response:
        """A 2xx answer (with `stream`, unread: the caller closes it).

        Retries, as `policy` allows, connection errors and timeouts (only those where nothing
        was sent when not `idempotent`) and the RETRYABLE statuses (only NOTHING_DONE when not
        `idempotent`). Raises TallyError with Tally's problem document for any other answer,
        or for the last failure once the policy gives up; `sleep` returning False (the caller
        gave up) ends the retries at once with that failure. `give_up_at` (a monotonic time)
        replaces the policy's deadline; past it, every base URL is still tried once.
        """
        if give_up_at is None:
            give_up_at = time.monotonic() + policy.deadline
        attempts = 0
        while True:
            used = self._pick()
            url = self.base_urls[used] + path
            attempts += 1
            wait: float | None = None
            try:
                built = self._http.build_request(
                    method, url, params=params, content=content, headers=headers
                )
                response = self._http.send(built, stream=stream)
            except httpx.TransportError as error:
                sent = not isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
                failure = unreachable(error, self.base_urls[used])
                self._fail_over(used)
                if sent and not idempotent:
                    raise failure from None
            else:
                if response.is_success:
                    return response
                if stream:
                    response.read()
                    response.close()
                failure = error_of(response.status_code, problem_of(response))
                retryable = RETRYABLE if idempotent else NOTHING_DONE
                if response.status_code not in retryable:
                    raise failure
                if response.status_code >= 500:
                    self._fail_over(used)
                wait = retry_after(response)
            retries = attempts - 1
            if policy.max_retries is not None and retries >= policy.max_retries:
                raise failure
            # Only a full round over the URLs without an answer waits (a Retry-After always
            # does): the next URL may well answer at once, so it is tried even past the deadline.
            round_over = attempts % len(self.base_urls) == 0
            delay = policy.backoff(retries) if round_over else 0.0
            if wait is not None:
                delay = max(delay, wait)
            if (round_over or wait is not None) and time.monotonic() + delay >= give_up_at:
                raise failure
            log.debug(
                "tally_client_retry",
                extra={"status": failure.status, "delay": delay, "attempt": attempts},
            )
            if delay > 0 and not sleep(delay):
                raise failure
