"""Export: the one read path of Tally."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

from tally.auth.service import Principal, Scope
from tally.crypto.sealing import TenantCipher
from tally.crypto.tenant_keys import TenantKeys
from tally.errors import LogRewound, NotFound
from tally.events.cursor import CursorCodec, Position
from tally.events.log import (
    Entry,
    ExportFilter,
    ExportPage,
    partition_of,
    resume_positions,
)
from tally.events.model import Cancellation, StoredEvent, format_time
from tally.metrics import NULL, Metrics
from tally.store.interface import EventLog


@dataclass(frozen=True, slots=True)
class Page:
    events: list[Entry]
    next_cursor: str
    has_more: bool


Streamed = tuple[Entry | None, str]
"""An entry of a stream and the cursor that resumes right after it; the last item, with no
entry, carries the cursor to poll with once the stream has reached the end of the log."""


E = TypeVar("E", bound=Entry)


class ExportService:
    def __init__(
        self, *, store: EventLog, cursors: CursorCodec, keys: TenantKeys, metrics: Metrics = NULL
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._cursors = cursors
        self._keys = keys

    def page(
        self, principal: Principal, filters: ExportFilter, *, cursor: str | None, limit: int
    ) -> Page:
        """The next page after `cursor` (the start when None) of the entries matching
        `filters` that the principal may read.

        Raises Forbidden without events:read or for a tenant outside the key's, InvalidInput
        for a cursor that is empty, was altered or was issued for other filters.
        """
        scoped, digest, at = self._begin(principal, filters, cursor)
        _, page = self._first(at, scoped, digest, limit)
        self._reported(principal, cursor, page)
        return Page(
            events=self._opened(page.events),
            next_cursor=self._cursors.encode(page.positions, page.start, digest, page.epoch),
            has_more=page.has_more,
        )

    def stream(
        self, principal: Principal, filters: ExportFilter, *, cursor: str | None, limit: int
    ) -> Iterator[Streamed]:
        """Every entry after `cursor` matching `filters`, each with the cursor that resumes
        after it, read `limit` at a time, each page in a short snapshot of its own (never
        one long transaction), so memory stays bounded by a page whatever the volume; then
        `(None, cursor to poll with)`.

        Raises as `page` does, and StoreUnavailable, before it returns: the checks and the
        first read happen now, so a refusal is an answer of its own and not a cut stream.
        Later failures raise from the iterator.
        """
        scoped, digest, at = self._begin(principal, filters, cursor)
        positions, first = self._first(at, scoped, digest, limit)
        self._reported(principal, cursor, first)
        entries = self._opened(first.events)
        return self._follow(
            scoped, digest, positions=positions, page=first, entries=entries, limit=limit
        )

    def _follow(
        self,
        filters: ExportFilter,
        digest: bytes,
        *,
        positions: list[int],
        page: ExportPage,
        entries: list[Entry],
        limit: int,
    ) -> Iterator[Streamed]:
        partitions, epoch = len(positions), page.epoch
        while True:
            # The cursor after an entry: every position as before the page, the entry's own
            # partition moved to its offset (partitions are read in order, so an entry's
            # predecessors in the page are at or below these). After the page's last entry,
            # the page's own positions, which also move partitions read to their end.
            after = list(positions)
            last = len(entries) - 1
            for index, (entry, offset) in enumerate(zip(entries, page.offsets, strict=True)):
                partition = partition_of(entry.tenant, partitions)
                after[partition] = offset
                if index == last:
                    yield entry, self._cursors.encode(page.positions, page.start, digest, epoch)
                else:
                    yield entry, self._cursors.encode(after, partition, digest, epoch)
            positions = page.positions
            if not page.has_more:
                yield None, self._cursors.encode(page.positions, page.start, digest, epoch)
                return
            page = self._read(positions, page.start, filters, limit)
            # Restored under the stream: it is cut, and its last cursor is refused.
            self._same_log(Position(positions, page.start, epoch), page, digest)
            entries = self._opened(page.events)

    def _reported(self, principal: Principal, cursor: str | None, page: ExportPage) -> None:
        """A key that sends a cursor reports how far it has read: its lag is measured."""
        if cursor is not None:
            self._metrics.export_read(key_id=principal.key_id, lag=page.lag)

    def _read(
        self, positions: list[int], start: int, filters: ExportFilter, limit: int
    ) -> ExportPage:
        return self._store.read(positions=positions, start=start, filters=filters, limit=limit)

    def _first(
        self, at: Position | None, filters: ExportFilter, digest: bytes, limit: int
    ) -> tuple[list[int], ExportPage]:
        """The positions read from and the first page after the cursor at `at` (None: from
        the start, in whatever epoch the log is in), refused if the log was rewound under
        it."""
        if at is None:
            positions = [0] * self._store.partitions
            return positions, self._read(positions, 0, filters, limit)
        page = self._read(at.offsets, at.start, filters, limit)
        self._same_log(at, page, digest)
        return at.offsets, page

    def _same_log(self, at: Position, page: ExportPage, digest: bytes) -> None:
        """Raises LogRewound when the cursor at `at` is ahead of the log `page` was read
        from: past what an epoch begun after its own started with (a restore rewound the log
        to before where the reader was), or past a partition's head (rewound under the same
        epoch: a point-in-time recovery before `tally epoch renew`). Reading on would skip
        the entries that take the offsets it has passed. A cursor of an earlier epoch that is
        behind the restored point is not ahead: the log up to there is the one it read, so
        it continues with no gap and no repeat."""
        within = all(o <= h for o, h in zip(at.offsets, page.heads, strict=True))
        if at.epoch == page.epoch and within:
            return
        history = self._store.log_epochs()
        resumed = resume_positions(at.offsets, at.epoch, history, page.heads)
        if resumed == at.offsets:
            return
        raise LogRewound(
            "This cursor is ahead of the export log: the log was restored from a backup "
            f"(its current epoch began {format_time(history[-1].started_at)}) to before the "
            "point your reader had read to, and entries after the restored point may have "
            "other offsets now. Continue with resume_cursor, from the last point your reader "
            "and the log agree on; entries you had read after it may come again: deduplicate "
            "them by (application, id, kind).",
            resume_cursor=self._cursors.encode(resumed, 0, digest, page.epoch),
        )

    def _begin(
        self, principal: Principal, filters: ExportFilter, cursor: str | None
    ) -> tuple[ExportFilter, bytes, Position | None]:
        """(the filters under the key's restriction, their digest, the cursor's position,
        None without a cursor)."""
        principal.require(Scope.EVENTS_READ)
        if filters.tenant is not None:
            principal.require_tenant(filters.tenant)
        scoped = replace(filters, tenants=principal.tenants)
        digest = scoped.digest()
        partitions = self._store.partitions
        at = (
            self._cursors.decode(cursor, filter_digest=digest, partitions=partitions)
            if cursor is not None
            else None
        )
        return scoped, digest, at

    def get(self, principal: Principal, application: str, event_id: str) -> StoredEvent:
        """Raises NotFound when there is no such event among those the key may read.

        Another tenant's event is NotFound too, with the same message: a different answer
        would tell a tenant-restricted key which ids other tenants' applications have used.
        """
        principal.require(Scope.EVENTS_READ)
        event = self._store.get_event(application, event_id)
        if event is None or not principal.may_serve(event.tenant):
            raise NotFound("There is no event with this application and id.")
        event.cancelled = self._store.get_cancellation(application, event_id)
        entries: list[Entry] = [event] if event.cancelled is None else [event, event.cancelled]
        self._opened(entries)
        return event

    def _opened(self, entries: list[Entry]) -> list[Entry]:
        return opened(self._keys, entries)


def opened(keys: TenantKeys, entries: list[E]) -> list[E]:
    """`entries` with their attributes and reasons opened, or marked shredded: what every
    reader of the log is given (the export, the reconciliation digest). Raises SealBroken for
    a sealed value that is not its row's (tampering): no answer rather than a wrong one."""
    ciphers = keys.ciphers_of({entry.tenant for entry in entries})
    for entry in entries:
        cipher = ciphers[entry.tenant]
        if isinstance(entry, Cancellation):
            open_reason(entry, cipher)
        else:
            _open(entry, cipher)
    return entries


def open_reason(cancellation: Cancellation, cipher: TenantCipher | None) -> Cancellation:
    """`cancellation` with its reason opened in place, or marked shredded."""
    if cipher is None:
        cancellation.shredded = True
    else:
        cancellation.reason = cipher.open_reason(
            application=cancellation.application,
            event_id=cancellation.id,
            sealed=cancellation.sealed_reason,
        )
    return cancellation


def _open(event: StoredEvent, cipher: TenantCipher | None) -> StoredEvent:
    if cipher is None:
        event.shredded = True
    else:
        sealed = event.sealed
        event.attributes_json = cipher.open(
            application=event.application, event_id=event.id, sealed=sealed
        )
    return event
