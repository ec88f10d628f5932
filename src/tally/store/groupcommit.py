"""Group commit: concurrent requests share one durable transaction.

Requests hand their events to one writer thread and wait. While the writer commits one
transaction (the fsync is the slow part), later requests queue up; the writer then takes all
of them, up to `max_events`, into the next transaction. A lone request is never delayed on
purpose, and each request is answered only after the transaction holding its events commits,
or gets that transaction's error (and should retry: duplicates are recognised).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from tally.errors import StoreUnavailable
from tally.events.model import NewEvent, Outcome
from tally.metrics import NULL, Metrics
from tally.store.interface import EventLog

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Request:
    events: Sequence[NewEvent]
    done: Future[list[Outcome]]
    queued: float = field(default_factory=time.perf_counter)


BatchObserver = Callable[[int, int], None]
"""Called after each commit with (requests, events) in it: for metrics."""


class GroupCommitter:
    def __init__(
        self,
        store: EventLog,
        *,
        max_events: int = 5000,
        observe: BatchObserver | None = None,
        metrics: Metrics = NULL,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._max_events = max_events
        self._observe = observe
        self._metrics = metrics
        self._clock = clock
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tally-group-commit", daemon=True)
        self._thread.start()

    def append(self, events: Sequence[NewEvent]) -> list[Outcome]:
        """Store `events` durably (shared with concurrent callers); blocks until committed.

        Raises StoreUnavailable while closing, or the store's error when the transaction
        failed. Then the events were rolled back, or, if the connection was lost during
        COMMIT, may have been stored: either way a retry stores each exactly once.
        """
        return self._queued(events).result()

    async def append_async(self, events: Sequence[NewEvent]) -> list[Outcome]:
        """`append` for a caller on an event loop, which goes on serving while it waits.

        The transaction is not cancelled with the caller: once queued, the events are
        committed (or not) as one with the others, whatever becomes of the request."""
        return await asyncio.shield(asyncio.wrap_future(self._queued(events)))

    def _queued(self, events: Sequence[NewEvent]) -> Future[list[Outcome]]:
        request = _Request(events=events, done=Future())
        with self._lock:
            if self._closed:
                raise StoreUnavailable("Tally is shutting down.")
            self._queue.put(request)
        return request.done

    def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _take(self, first: _Request) -> tuple[list[_Request], bool]:
        taken, count = [first], len(first.events)
        while count < self._max_events:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return taken, True
            taken.append(item)
            count += len(item.events)
        return taken, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            taken, stopping = self._take(first)
            self._commit(taken)

    def _commit(self, taken: list[_Request]) -> None:
        events = [event for request in taken for event in request.events]
        began = time.perf_counter()
        try:
            outcomes = self._store.append(events, received_at=self._clock())
        except Exception as error:  # noqa: BLE001 - every waiter must hear of any failure
            if not isinstance(error, StoreUnavailable):
                log.error("group_commit_failed", error_type=type(error).__name__)
            for request in taken:
                request.done.set_exception(error)
            return
        start = 0
        for request in taken:
            end = start + len(request.events)
            request.done.set_result(outcomes[start:end])
            start = end
        done = time.perf_counter()
        waits = [done - request.queued for request in taken]
        try:
            self._metrics.commit(
                requests=len(taken), events=len(events), seconds=done - began, waits=waits
            )
            if self._observe is not None:
                self._observe(len(taken), len(events))
        except Exception:  # noqa: BLE001 - metrics must never stop the writer
            log.warning("group_commit_observer_failed")
