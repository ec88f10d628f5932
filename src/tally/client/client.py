"""`Client`: report events to Tally and read them back."""

from __future__ import annotations

import atexit
import json
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from tally.client.errors import ClientClosed, TallyError
from tally.client.events import Event, encode
from tally.client.reading import Export, Meters, query
from tally.client.reporter import MAX_BATCH_BYTES, FlushResult, OnFailure, Reporter
from tally.client.transport import RetryPolicy, Transport, problem_of


class Client:
    """A Tally client for one key, over one or more base URLs of the same deployment.

    Reporting: `report()` queues an event and returns its id at once; a background thread
    sends batches and retries them (see `RetryPolicy`) until each event is acknowledged or
    handed back as failed — to `on_failure` (called from that thread with the failed events;
    `report()` from it never waits for room) and in the next `flush()`/`close()` result.
    Nothing reported is dropped silently: `close()`
    returns only once every event is settled (an interpreter that exits with the client open
    closes it first, so its failures still reach `on_failure`).

    Arguments: `batch_size` events (at most 1,000) or `max_batch_bytes` (under 1 MiB) a
    request, `max_delay` seconds an event may wait for its batch to fill, `max_buffered`
    events unsettled at most (then `report` waits), `timeout` seconds per HTTP request,
    `deadline` seconds a request is retried and `max_retries` attempts after the first,
    `verify` as httpx's (a CA bundle path or an `ssl.SSLContext`, e.g. with a client
    certificate for mutual TLS), `transport` an httpx transport (for proxies and tests).
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        key: str,
        *,
        batch_size: int = 500,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_delay: float = 1.0,
        max_buffered: int = 100_000,
        timeout: float = 10.0,
        deadline: float = 60.0,
        max_retries: int | None = None,
        verify: Any = True,
        on_failure: OnFailure | None = None,
        compress: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self.policy = RetryPolicy(deadline=deadline, max_retries=max_retries)
        self._transport = Transport(urls, key, timeout=timeout, verify=verify, transport=transport)
        self._reporter = Reporter(
            self._transport,
            policy=self.policy,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            max_delay=max_delay,
            max_buffered=max_buffered,
            on_failure=on_failure,
            compress=compress,
        )
        self.meters = Meters(self._call)
        # Weakly: the hook must not keep an abandoned client alive.
        ref = weakref.ref(self)
        self._atexit = lambda: (client := ref()) is not None and client.close()
        atexit.register(self._atexit)

    def __repr__(self) -> str:
        return f"Client(base_urls={list(self._transport.base_urls)!r})"

    @property
    def base_urls(self) -> tuple[str, ...]:
        return self._transport.base_urls

    @property
    def active_base_url(self) -> str:
        """The base URL requests go to now: the last one that answered."""
        return self._transport.active_base_url

    # --- reporting -------------------------------------------------------------------------

    def report(self, event: Event | Mapping[str, Any], *, timeout: float | None = None) -> str:
        """Queue `event` (an Event, or a mapping of the API's fields) and return its id (the
        caller's, or a new UUIDv7 in hex). Its id and time are fixed now, so retries are safe.

        Blocks while `max_buffered` events are unsettled; raises BufferFull if no room came
        within `timeout` seconds (None: wait; 0: never wait), ClientClosed after `close()`,
        TypeError for a float quantity, ValueError for a naive datetime, a NaN, or an event
        larger than a batch. An event refused so was not reported: the caller still holds it.
        """
        wire, body = encode(event)
        self._reporter.put(wire, body, timeout)
        identifier: str = wire["id"]
        return identifier

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Send everything reported so far and wait until each event is acknowledged or
        failed (or `timeout` seconds: then `pending` counts the rest, still being sent).
        The result covers what was settled since the previous flush() or close()."""
        return self._reporter.flush(timeout)

    def close(self, timeout: float | None = None) -> FlushResult:
        """Flush, stop the sender and close the connections. With `timeout`, events not
        acknowledged by then are handed back as failed (a request in flight may add up to
        one request `timeout`). A second close returns an empty result."""
        atexit.unregister(self._atexit)
        result = self._reporter.close(timeout)
        self._transport.close()
        return result

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        """One request with the retry policy; the parsed JSON answer (None for an empty one).
        Raises TallyError with Tally's problem document."""
        if self._reporter.closed:
            raise ClientClosed
        content = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if content is not None:
            headers["Content-Type"] = "application/json"
        response = self._transport.request(
            method,
            path,
            policy=self.policy,
            params=params,
            content=content,
            headers=headers,
            idempotent=method in ("GET", "DELETE"),
        )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise TallyError(response.status_code, problem_of(response)) from None

    def export(self, cursor: str | None = None, **filters: Any) -> Export:
        """Every export entry matching `filters` (the API's: `tenant`, `application`, `type`,
        `subject`, `time_from`, `time_to`, `received_from`, `received_to`, `kind`, `limit` —
        datetimes are sent as RFC 3339), from `cursor` (None: the beginning), as an iterator
        of `(entry, cursor)`; see `Export`. Raises TallyError while iterating."""
        if self._reporter.closed:
            raise ClientClosed
        return Export(self._transport, self.policy, cursor, query(filters))

    def usage(
        self,
        *,
        from_: datetime | str,
        to: datetime | str,
        window: str | None = None,
        tz: str | None = None,
        aggregation: str | None = None,
        unique_of: str | None = None,
        group_by: Sequence[str] = (),
        **filters: Any,
    ) -> dict[str, Any]:
        """`GET /v1/usage` over `[from_, to)`: `{"from", "to", "window", "tz", "aggregation",
        "rows": [{"window_start", "window_end", "group", "value"}]}`. `filters` as the
        export's (`tenant`, `type`, `subject`, `application`, …)."""
        params = query(
            {
                "from": from_,
                "to": to,
                "window": window,
                "tz": tz,
                "aggregation": aggregation,
                "unique_of": unique_of,
                "group_by": list(group_by) or None,
                **filters,
            }
        )
        answer: dict[str, Any] = self._call("GET", "/v1/usage", params=params)
        return answer

    def reconciliation(
        self,
        *,
        tenant: str | None = None,
        from_: datetime | str,
        to: datetime | str,
        period: str,
        tz: str | None = None,
    ) -> dict[str, Any]:
        """`GET /v1/reconciliation`: `{"rows": [{"tenant", "type", "period_start",
        "period_end", "count", "sum", "digest", "last_received_at", "cancelled", "final",
        "final_at"}]}`; compare a row's `digest` with `reconciliation_digest(entries)`."""
        params = query({"tenant": tenant, "from": from_, "to": to, "period": period, "tz": tz})
        answer: dict[str, Any] = self._call("GET", "/v1/reconciliation", params=params)
        return answer
