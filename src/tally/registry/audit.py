"""Who performs an administrative action, and the audit entry that records it.

Every administrative action is recorded in the audit log in the same store transaction as the
action itself (see `EventStore`: administrative writes take `audit=`). An action that is not a
single transaction, or an attempt that was refused, is recorded on its own with
`Registry.audit`.
"""

from __future__ import annotations

import getpass
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from tally.errors import TallyError

log = structlog.get_logger(__name__)

JsonValue = str | int | bool | None | list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One administrative action, as recorded: who, what, when, from where.

    `details` is a small JSON object of non-secret facts (never a key's secret, never an
    attribute value). `actor` is a key id or `cli:<OS user>`; `source` the client's address,
    or `cli`.
    """

    at: datetime
    actor: str
    action: str
    target: str | None
    details: dict[str, JsonValue]
    source: str
    request_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord(AuditEntry):
    """An entry as listed: `seq` orders the log (higher is newer)."""

    seq: int


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which entries a listing wants; `before` is the cursor (a `seq`: older ones only)."""

    action: str | None = None
    actor: str | None = None
    since: datetime | None = None
    before: int | None = None


CLI_SOURCE = "cli"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: `id` is a key id (API) or `cli:<OS user>`; `source` is the client's address
    (API) or `cli`; `request_id` ties the entry to the request's logs."""

    id: str
    source: str
    request_id: str | None = None

    @classmethod
    def cli(cls) -> Actor:
        """The operator running the `tally` command on this host."""
        try:
            user = getpass.getuser()
        except (OSError, KeyError):  # no login name and no passwd entry (some containers)
            user = "unknown"
        return cls(id=f"cli:{user}", source=CLI_SOURCE)

    @classmethod
    def api(cls, key_id: str, *, client: str | None, request_id: str | None) -> Actor:
        """A caller of the HTTP API, by its key id and its ASGI client address."""
        return cls(id=key_id, source=client or "unknown", request_id=request_id)

    def entry(
        self,
        action: str,
        *,
        at: datetime,
        target: str | None,
        details: dict[str, JsonValue] | None = None,
    ) -> AuditEntry:
        """An audit entry of `action` on `target` by this actor. `details` must hold no secret
        and no attribute value: ids, scopes, times and counts only."""
        return AuditEntry(
            at=at,
            actor=self.id,
            action=action,
            target=target,
            details=details or {},
            source=self.source,
            request_id=self.request_id,
        )


# Acting on nobody's behalf: test fixtures and code inside the process. Every API route and
# CLI command passes its own actor.
SYSTEM = Actor(id="system", source="local")


DENIED = "access.denied"
# A new epoch of the export log (`tally epoch renew`, and the last step of `tally restore`).
EPOCH_RENEWED = "log.epoch_renew"


@dataclass(slots=True)
class _Denials:
    written_at: datetime  # when this key's last row for the route was written
    held: int = 0  # denials since then, not yet in any row
    last: Actor | None = None  # the latest of them (its address and request id)


class DenialLog:
    """Refused admin attempts (`access.denied`), at most one row per key, route and method in
    any `window`, each row with the `count` of denials it stands for.

    Any valid key can be refused as often as its rate limit lets it; a row per refusal would
    let it flood the log, and the log is append-only, so a row cannot be updated with a count
    later. A counter table beside the log would still cost a write (on SQLite, the one write
    lock) per refusal. Instead the first refusal of a quiet key and route is written at once
    (count 1), the ones after it are counted here, and the next row carries their count: the
    key's next refusal once `window` has passed writes it, or a sweep when any refusal comes
    later, or `flush` at shutdown. The counts of all rows add up to the refusals. Memory is
    bounded: at most `capacity` key-route pairs are held; the oldest is written out to make
    room. Each server process keeps its own counts, so with N workers there are up to N rows
    per window.

    `write` appends one entry; when it fails, the count is lost, never the answer (a refusal
    stays a 403 whatever the log does).
    """

    def __init__(
        self,
        write: Callable[[AuditEntry], None],
        clock: Callable[[], datetime],
        *,
        window: timedelta = timedelta(minutes=1),
        capacity: int = 4096,
    ) -> None:
        self._write = write
        self._clock = clock
        self._window = window
        self._capacity = capacity
        self._lock = threading.Lock()
        self._held: OrderedDict[tuple[str, str, str], _Denials] = OrderedDict()
        self._swept_at: datetime | None = None

    def deny(self, actor: Actor, *, route: str, method: str) -> None:
        """Count one refusal of `actor` on `route` (its template, e.g. /v1/keys/{key_id}, so
        the paths a caller makes up do not multiply the rows) and write what is due."""
        now = self._clock()
        due: list[tuple[tuple[str, str, str], Actor, int]] = []
        with self._lock:
            pair = (actor.id, route, method)
            found = self._held.get(pair)
            if found is None or now - found.written_at >= self._window:
                due.append((pair, actor, 1 + (found.held if found else 0)))
                self._held[pair] = _Denials(written_at=now)
                self._held.move_to_end(pair)
            else:
                found.held += 1
                found.last = actor
            due.extend(self._sweep(now))
        for (_, route_of, method_of), who, count in due:
            self._record(who, route_of, method_of, count, now)

    def flush(self) -> None:
        """Write every count still held (at shutdown)."""
        now = self._clock()
        with self._lock:
            held = [(pair, d.last, d.held) for pair, d in self._held.items() if d.held]
            self._held.clear()
        for (_, route, method), who, count in held:
            if who is not None:
                self._record(who, route, method, count, now)

    def _sweep(self, now: datetime) -> list[tuple[tuple[str, str, str], Actor, int]]:
        """Under the lock: the held counts whose window has passed (at most once a second,
        so a flood does not walk every pair on every refusal) and those evicted to keep
        within `capacity`. Pairs quiet for a whole window are forgotten."""
        due: list[tuple[tuple[str, str, str], Actor, int]] = []
        if self._swept_at is None or now - self._swept_at >= timedelta(seconds=1):
            self._swept_at = now
            for pair, denials in list(self._held.items()):
                if now - denials.written_at < self._window:
                    continue
                if denials.held and denials.last is not None:
                    # Written now, so the pair's window starts again: a refusal right after
                    # this is held, not a second row within a minute.
                    due.append((pair, denials.last, denials.held))
                    self._held[pair] = _Denials(written_at=now)
                    self._held.move_to_end(pair)
                else:
                    del self._held[pair]
        while len(self._held) > self._capacity:
            pair, denials = self._held.popitem(last=False)
            if denials.held and denials.last is not None:
                due.append((pair, denials.last, denials.held))
        return due

    def _record(self, who: Actor, route: str, method: str, count: int, now: datetime) -> None:
        details: dict[str, JsonValue] = {"method": method, "count": count}
        try:
            self._write(who.entry(DENIED, at=now, target=route, details=details))
        except TallyError as error:
            log.warning("denial_not_audited", error_type=type(error).__name__, count=count)
