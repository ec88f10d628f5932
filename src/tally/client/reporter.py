"""The background sender: buffers reported events and sends them in batches until each one
is acknowledged by Tally or handed back to the caller as failed."""

from __future__ import annotations

import gzip
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tally.client.errors import BufferFull, ClientClosed, TallyError
from tally.client.transport import RetryPolicy, Transport

log = logging.getLogger("tally.client")

# Tally's defaults: at most 1,000 events and 1 MiB (1,048,576 bytes) a request.
MAX_BATCH_EVENTS = 1000
MAX_BATCH_BYTES = 1_000_000
_ENVELOPE = len(b'{"events":[]}')
# Bodies above this are sent gzip-compressed (Tally bounds the body after decompression).
GZIP_ABOVE = 16 * 1024
_EVENT_POINTER = re.compile(r"^/events/\d+")


@dataclass(frozen=True)
class Failure:
    """An event handed back: Tally did not acknowledge it. Reporting `event` again is safe
    (it keeps its id: if it was stored after all, Tally answers `duplicate`).

    `status` and `problem`: Tally's answer when it refused the whole batch (a 401, a 413…) or
    gave up retrying (None and a written problem when there was no answer). `errors`: for an
    event Tally rejected (`status` 200), its errors, each `pointer` relative to the event
    (`/quantity`).
    """

    event: dict[str, Any]
    reason: str
    status: int | None = None
    problem: dict[str, Any] | None = None
    errors: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class FlushResult:
    """What was settled since the previous `flush()` or `close()` returned: `acknowledged`
    events (stored by this or an earlier request: `duplicates` of them were already stored),
    and `failed` ones. `pending`: events reported and not yet settled when it returned (0
    unless a timeout ended the wait)."""

    acknowledged: int = 0
    duplicates: int = 0
    failed: tuple[Failure, ...] = ()
    pending: int = 0


OnFailure = Callable[[Sequence[Failure]], None]


@dataclass
class _Pending:
    event: dict[str, Any]
    body: bytes
    reported_at: float = field(default_factory=time.monotonic)


class Reporter:
    """Buffers events and sends them from one thread, oldest first, a batch at a time.

    A batch leaves when it holds `batch_size` events or `max_batch_bytes`, when its oldest
    event has waited `max_delay` seconds, or at once on `flush()` and `close()`. At most
    `max_buffered` events are unsettled at a time; `report` waits for room.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        policy: RetryPolicy,
        batch_size: int,
        max_batch_bytes: int,
        max_delay: float,
        max_buffered: int,
        on_failure: OnFailure | None,
        compress: bool,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_EVENTS:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH_EVENTS}")
        if not 1024 <= max_batch_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"max_batch_bytes must be 1024 to {MAX_BATCH_BYTES}")
        if max_buffered < batch_size:
            raise ValueError("max_buffered must be at least batch_size")
        self._transport = transport
        self._policy = policy
        self._batch_size = batch_size
        self._max_bytes = max_batch_bytes
        self._max_delay = max_delay
        self._max_buffered = max_buffered
        self._on_failure = on_failure
        self._compress = compress
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        self._reported = 0
        self._taken = 0
        self._settled = 0
        self._urgent_through = 0  # flush() and close() send events up to this count at once
        self._closing = False
        self._abort_at: float | None = None
        self._acknowledged = 0
        self._duplicates = 0
        self._failed: list[Failure] = []
        self._thread = threading.Thread(target=self._run, name="tally-client-sender", daemon=True)
        self._thread.start()

    # --- the caller's side ----------------------------------------------------------------

    def put(self, event: dict[str, Any], body: bytes, timeout: float | None) -> None:
        """Queue an encoded event. Raises BufferFull when no room came within `timeout`
        (None: wait as long as it takes), ClientClosed after close(), ValueError for an
        event larger than a batch may be."""
        if len(body) + _ENVELOPE > self._max_bytes:
            raise ValueError(f"the event is {len(body)} bytes: over the batch limit")
        if threading.current_thread() is self._thread:
            # From on_failure: waiting for room would wait for this very thread.
            timeout = 0.0
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closing and self._reported - self._settled >= self._max_buffered:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BufferFull(self._max_buffered)
                self._cond.wait(remaining)
            if self._closing:
                raise ClientClosed
            self._queue.append(_Pending(event, body))
            self._queued_bytes += len(body) + 1
            self._reported += 1
            self._cond.notify_all()

    def flush(self, timeout: float | None) -> FlushResult:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._reported
            self._urgent_through = max(self._urgent_through, target)
            self._cond.notify_all()
            # One thread sends in order, so once `target` events are settled, the first
            # `target` reported are.
            while self._settled < target:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._result()

    def close(self, timeout: float | None) -> FlushResult:
        with self._cond:
            self._closing = True
            self._urgent_through = self._reported
            if timeout is not None:
                self._abort_at = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            return self._result()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closing

    def _result(self) -> FlushResult:
        result = FlushResult(
            acknowledged=self._acknowledged,
            duplicates=self._duplicates,
            failed=tuple(self._failed),
            pending=self._reported - self._settled,
        )
        self._acknowledged, self._duplicates, self._failed = 0, 0, []
        return result

    # --- the sender thread -----------------------------------------------------------------

    def _aborted(self) -> bool:
        return self._abort_at is not None and time.monotonic() >= self._abort_at

    def _next_batch(self) -> list[_Pending] | None:
        """The next batch to send, waiting until one is due; None once closed and empty.
        Called holding the lock."""
        while True:
            if not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
                continue
            if self._aborted():
                return self._take(len(self._queue), float("inf"))
            age = time.monotonic() - self._queue[0].reported_at
            due = (
                len(self._queue) >= self._batch_size
                or self._queued_bytes + _ENVELOPE >= self._max_bytes
                or self._urgent_through > self._taken
                or age >= self._max_delay
            )
            if due:
                return self._take(self._batch_size, self._max_bytes)
            self._cond.wait(self._max_delay - age)

    def _take(self, count: int, limit: float) -> list[_Pending]:
        batch: list[_Pending] = []
        size = _ENVELOPE
        while self._queue and len(batch) < count:
            item = self._queue[0]
            if batch and size + len(item.body) + 1 > limit:
                break
            self._queue.popleft()
            self._queued_bytes -= len(item.body) + 1
            size += len(item.body) + 1
            batch.append(item)
        self._taken += len(batch)
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                aborted = self._aborted()
            if batch is None:
                return
            if aborted:
                reason = "The client was closed before Tally acknowledged the event."
                self._settle(batch, [], [Failure(p.event, reason) for p in batch])
                continue
            try:
                self._send(batch)
            except Exception as error:  # whatever broke, the batch is handed back
                log.exception("tally_client_sender_error")
                reason = f"The SDK failed sending the event ({type(error).__name__})."
                self._settle(batch, [], [Failure(p.event, reason) for p in batch])

    def _sleep(self, seconds: float) -> bool:
        """Wait `seconds` unless close()'s timeout comes first: False then."""
        end = time.monotonic() + seconds
        with self._cond:
            while not self._aborted():
                now = time.monotonic()
                if now >= end:
                    return True
                wake = end if self._abort_at is None else min(end, self._abort_at)
                self._cond.wait(wake - now)
            return False

    def _send(self, batch: list[_Pending]) -> None:
        """Send `batch` until it is settled. A batch over the server's body limit (413: its
        TALLY_MAX_BODY_BYTES may be below the SDK's) is split in two and each half sent."""
        body = b'{"events":[' + b",".join(p.body for p in batch) + b"]}"
        headers = {"Content-Type": "application/json"}
        if self._compress and len(body) > GZIP_ABOVE:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        try:
            response = self._transport.request(
                "POST",
                "/v1/events",
                policy=self._policy,
                content=body,
                headers=headers,
                sleep=self._sleep,
                # An event is tried until `deadline` after it was reported, not after its
                # batch left: after a long outage the whole backlog is handed back at once,
                # rather than a deadline per batch one after the other.
                give_up_at=batch[0].reported_at + self._policy.deadline,
            )
        except TallyError as error:
            if error.status == 413 and len(batch) > 1:
                half = len(batch) // 2
                self._send(batch[:half])
                self._send(batch[half:])
                return
            failures = [
                Failure(p.event, str(error), status=error.status, problem=error.problem)
                for p in batch
            ]
            self._settle(batch, [], failures)
            return
        try:
            outcomes = {o["index"]: o for o in response.json()["events"]}
        except (ValueError, KeyError, TypeError):
            outcomes = {}
        acknowledged: list[str] = []
        failures = []
        for index, pending in enumerate(batch):
            outcome = outcomes.get(index)
            status = outcome.get("status") if isinstance(outcome, dict) else None
            if status in ("accepted", "duplicate"):
                acknowledged.append(status)
            elif status == "rejected":
                assert isinstance(outcome, dict)  # noqa: S101 - narrowed by status
                errors = tuple(
                    {**e, "pointer": _EVENT_POINTER.sub("", str(e["pointer"]), count=1)}
                    if "pointer" in e
                    else e
                    for e in outcome.get("errors", [])
                    if isinstance(e, dict)
                )
                failures.append(
                    Failure(pending.event, "Tally rejected the event.", status=200, errors=errors)
                )
            else:
                reason = "Tally's answer held no outcome for the event."
                failures.append(Failure(pending.event, reason, status=response.status_code))
        self._settle(batch, acknowledged, failures)

    def _settle(
        self, batch: list[_Pending], acknowledged: list[str], failures: list[Failure]
    ) -> None:
        # The callback runs before the events count as settled, so flush() and close() return
        # only after it has seen them.
        if failures and self._on_failure is not None:
            try:
                self._on_failure(failures)
            except Exception:  # a faulty callback must not stop the sender
                log.exception("tally_client_on_failure_raised")
        with self._cond:
            self._settled += len(batch)
            self._acknowledged += len(acknowledged)
            self._duplicates += acknowledged.count("duplicate")
            self._failed.extend(failures)
            self._cond.notify_all()
