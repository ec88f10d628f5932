"""Export: the one read path of Tally."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

from tally.auth.service import Principal, Scope
from tally.crypto.sealing import TenantCipher
from tally.crypto.tenant_keys import TenantKeys
from tally.errors import LogRewound, NotFound
from tally.events.cursor import CursorCodec, Position
from tally.events.log import (
    EVENT_ROW,
    ROW_APPLICATION,
    ROW_ID,
    ROW_KIND,
    ROW_OFFSET,
    ROW_PARTITION,
    ROW_SEALED,
    ROW_TENANT,
    Entry,
    ExportFilter,
    ExportPage,
    LogRow,
    Opened,
    resume_positions,
)
from tally.events.model import Cancellation, StoredEvent, format_time
from tally.gil import handing_off
from tally.metrics import NULL, Metrics
from tally.store.interface import EventLog


@dataclass(frozen=True, slots=True)
class Page:
    events: list[Opened]
    next_cursor: str
    has_more: bool


Streamed = list[tuple[Opened | None, str]]
"""One read of a stream: each entry with the cursor that resumes right after it; the last
read ends with an item with no entry, whose cursor is the one to poll with once the stream
has reached the end of the log."""


E = TypeVar("E", bound=Entry)

CIPHERS_KEPT = 10_000  # the export's ciphers by wrapped data key (TenantKeys keeps as many)

# A stream reads its next page while the reader takes the current one (one read ahead per
# stream, this many at once in a process; a read still waiting for a thread when its stream
# wants it is taken back and made by the stream itself). Half of a page's read is the
# database's own time, which the formatting and sending of the page before now overlaps.
# NDJSON of the 10 M-event store, two A/B pairs in the same minutes: 46,216 -> 54,458 and
# 60,129 -> 65,285 lines/s.
READS_AHEAD = 4
_ahead = ThreadPoolExecutor(max_workers=READS_AHEAD, thread_name_prefix="tally-export-ahead")


class ExportService:
    def __init__(
        self, *, store: EventLog, cursors: CursorCodec, keys: TenantKeys, metrics: Metrics = NULL
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._cursors = cursors
        self._keys = keys
        # tenant -> its cipher, for the rows of pages: a tenant's data key never changes once
        # made (a rewrap wraps the same key anew; a shred destroys it for good), and each page
        # says which of its tenants are shredded in its own snapshot, so a page asks the store
        # for keys only for tenants not met before. A plain dict, like TenantKeys' cache.
        self._ciphers: dict[str, TenantCipher] = {}

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
            events=self._opened(page),
            next_cursor=self._cursors.encode(page.positions, page.start, digest, page.epoch),
            has_more=page.has_more,
        )

    def stream(
        self, principal: Principal, filters: ExportFilter, *, cursor: str | None, limit: int
    ) -> Iterator[Streamed]:
        """Every entry after `cursor` matching `filters`, each with the cursor that resumes
        after it, read `limit` at a time, each page in a short snapshot of its own (never
        one long transaction), so memory stays bounded by a page whatever the volume; one
        list per read, the last one ending with `(None, cursor to poll with)`.

        Raises as `page` does, and StoreUnavailable, before it returns: the checks and the
        first read happen now, so a refusal is an answer of its own and not a cut stream.
        Later failures raise from the iterator.
        """
        scoped, digest, at = self._begin(principal, filters, cursor)
        positions, first = self._first(at, scoped, digest, limit)
        self._reported(principal, cursor, first)
        entries = self._opened(first)
        return self._follow(
            scoped, digest, positions=positions, page=first, entries=entries, limit=limit
        )

    def _follow(
        self,
        filters: ExportFilter,
        digest: bytes,
        *,
        positions: list[int],
        page: ExportPage[LogRow],
        entries: list[Opened] | None,
        limit: int,
    ) -> Iterator[Streamed]:
        """The stream from `page` (read after `positions`, its `entries` opened or None).

        The next page's read starts as soon as this one's has arrived, before this page is
        opened, given its cursors and formatted: those take longer than the read's own share
        of the process, and a read started after them left the stream waiting for it (the
        stream's thread waited 37% of its time when only the formatting overlapped the read).
        At most two pages are held: the one being written and the one being read."""
        epoch = page.epoch
        while page.has_more:
            following = (Position(page.positions, page.start, epoch), filters, digest, limit)
            ahead = _ahead.submit(self._next, *following)
            try:
                yield self._lines(positions, page, digest, epoch, entries)
            except BaseException:  # the stream closed (a reader gone): the read is dropped
                ahead.cancel()
                raise
            positions, entries = page.positions, None
            # Not started (every thread busy with other streams): read now, as before. A
            # failure (StoreUnavailable, LogRewound) raises here either way, where the read
            # would have.
            page = self._next(*following) if ahead.cancel() else ahead.result()
        yield self._lines(positions, page, digest, epoch, entries)

    def _lines(
        self,
        positions: list[int],
        page: ExportPage[LogRow],
        digest: bytes,
        epoch: bytes,
        entries: list[Opened] | None,
    ) -> Streamed:
        """The page read after `positions`, each entry opened (unless `entries` are given)
        with the cursor (of the stream's `epoch`) that resumes after it, and the end line
        after the log's last page."""
        if entries is None:
            entries = self._opened(page)
        # The cursor after an entry: every position as before the page, the entry's own
        # partition moved to its offset (partitions are read in order, so an entry's
        # predecessors in the page are at or below these). After the page's last entry,
        # the page's own positions, which also move partitions read to their end.
        walk = self._cursors.walk(positions, page.start, digest, epoch)
        lines = entries[:-1]
        places = [(row[ROW_PARTITION], row[ROW_OFFSET]) for row, _ in lines]
        read: Streamed = list(zip(lines, walk.lines(places), strict=True))
        after = self._cursors.walk(page.positions, page.start, digest, epoch)
        if entries:
            read.append((entries[-1], after.current()))
        if not page.has_more:
            read.append((None, after.current()))
        return read

    def _next(
        self, at: Position, filters: ExportFilter, digest: bytes, limit: int
    ) -> ExportPage[LogRow]:
        """A stream's next page, after `at`. Raises LogRewound when the log was restored
        under the stream: it is cut, and its last cursor is refused."""
        page = self._read(at.offsets, at.start, filters, limit)
        self._same_log(at, page, digest)
        return page

    def _reported(self, principal: Principal, cursor: str | None, page: ExportPage[LogRow]) -> None:
        """A key that sends a cursor reports how far it has read: its lag is measured."""
        if cursor is not None:
            self._metrics.export_read(key_id=principal.key_id, lag=page.lag)

    def _read(
        self, positions: list[int], start: int, filters: ExportFilter, limit: int
    ) -> ExportPage[LogRow]:
        return self._store.read_rows(positions=positions, start=start, filters=filters, limit=limit)

    def _first(
        self, at: Position | None, filters: ExportFilter, digest: bytes, limit: int
    ) -> tuple[list[int], ExportPage[LogRow]]:
        """The positions read from and the first page after the cursor at `at` (None: from
        the start, in whatever epoch the log is in), refused if the log was rewound under
        it."""
        if at is None:
            positions = [0] * self._store.partitions
            return positions, self._read(positions, 0, filters, limit)
        page = self._read(at.offsets, at.start, filters, limit)
        self._same_log(at, page, digest)
        return at.offsets, page

    def _same_log(self, at: Position, page: ExportPage[LogRow], digest: bytes) -> None:
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
        opened(self._keys, entries)
        return event

    def _opened(self, page: ExportPage[LogRow]) -> list[Opened]:
        """The page's rows with their attributes and reasons opened (None: shredded).
        Raises SealBroken for a sealed value that is not its row's, as `opened` does."""
        ciphers = self._ciphers_of(page)
        found: list[Opened] = []
        for row in handing_off(page.events):
            cipher = ciphers[row[ROW_TENANT]]
            if cipher is None:
                found.append((row, None))
            elif row[ROW_KIND] == EVENT_ROW:
                attributes = cipher.open(
                    application=row[ROW_APPLICATION], event_id=row[ROW_ID], sealed=row[ROW_SEALED]
                )
                found.append((row, attributes))
            else:
                reason = cipher.open_reason(
                    application=row[ROW_APPLICATION], event_id=row[ROW_ID], sealed=row[ROW_SEALED]
                )
                found.append((row, reason))
        return found

    def _ciphers_of(self, page: ExportPage[LogRow]) -> dict[str, TenantCipher | None]:
        """A cipher for each tenant of the page, None for one shredded (in the page's
        snapshot, or since)."""
        ciphers: dict[str, TenantCipher | None] = {}
        missing: list[str] = []
        for tenant in {row[ROW_TENANT] for row in page.events}:
            if tenant in page.shredded:
                ciphers[tenant] = None
                continue
            cipher = self._ciphers.get(tenant)
            if cipher is None:
                missing.append(tenant)
            else:
                ciphers[tenant] = cipher
        if missing:
            found = self._keys.ciphers_of(missing)
            if len(self._ciphers) + len(found) > CIPHERS_KEPT:
                self._ciphers.clear()
            self._ciphers.update(
                (tenant, cipher) for tenant, cipher in found.items() if cipher is not None
            )
            ciphers.update(found)
        return ciphers


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
