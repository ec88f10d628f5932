"""Reconciliation: per tenant, type and period, the figures a billing system checks its copy
against (docs/reconciliation.md), and whether the period is final.

The counts and sums are the database's (one grouped query, `EventLog.period_figures`); the
digest needs every event's fields with its attributes opened, so each tenant's events are
walked in (time, application, id) order in pages of bounded size and fed to `DigestAccumulator`
one at a time. Memory is one page plus one accumulator per row of the answer.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tally.auth.service import Principal, Scope
from tally.crypto.tenant_keys import TenantKeys
from tally.errors import StoreUnavailable
from tally.events import windows
from tally.events.digest import DigestAccumulator, stored_event_hash
from tally.events.log import ExportFilter, PeriodFigures
from tally.events.model import StoredEvent
from tally.services.export import opened
from tally.store.interface import ReconciliationStore

PAGE = 1000
# The figures and the digests are two reads; an event appended (or cancelled) between them
# shows as a difference in counts, and the pair is read again (see `rows`).
ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class ReconciliationRow:
    tenant: str
    type: str
    period_start: datetime
    period_end: datetime
    count: int
    sum: Decimal
    digest: str
    last_received_at: datetime
    cancelled_count: int
    cancelled_sum: Decimal
    final: bool
    final_at: datetime


def final_at(period_end: datetime, lateness_hours: int) -> datetime:
    """When a period ending at `period_end` becomes final for a tenant with this lateness
    window: from then on ingest refuses every event that would fall in it (ingest refuses
    times before `now - lateness`), and cancellations of its events are refused too. A period
    ending within the window of the year 9999's end is final at the calendar's last instant."""
    try:
        return period_end + timedelta(hours=lateness_hours)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC)


def digest_fields(event: StoredEvent) -> dict[str, Any]:
    """What `DigestAccumulator.add` hashes of an opened event: the fields a billing system
    receives, native values (docs/reconciliation.md)."""
    return {
        "application": event.application,
        "id": event.id,
        "tenant": event.tenant,
        "type": event.type,
        "quantity": event.quantity,
        "time": event.time,
        "subject": event.subject,
        "unit": event.unit,
        "attributes": None if event.shredded else event.attributes,
        "shredded": event.shredded,
    }


def digest_hash(event: StoredEvent, cancelled: bool) -> bytes:
    """The `event_hash` of `digest_fields(event)`, from the event's own fields."""
    return stored_event_hash(
        application=event.application,
        event_id=event.id,
        tenant=event.tenant,
        type=event.type,
        quantity=event.quantity,
        time=event.time,
        subject=event.subject,
        unit=event.unit,
        attributes=None if event.shredded else event.attributes,
        cancelled=cancelled,
    )


_Key = tuple[str, int]  # (type, period index), of one tenant


class ReconciliationService:
    def __init__(
        self,
        *,
        store: ReconciliationStore,
        keys: TenantKeys,
        clock: Callable[[], datetime],
        page: int = PAGE,
    ) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        self._page = page

    def rows(
        self,
        principal: Principal,
        *,
        tenant: str | None,
        start: datetime,
        end: datetime,
        period: str,
        tz: str,
    ) -> list[ReconciliationRow]:
        """One row per (tenant, type, period) of `[start, end)` that holds an event, ordered
        by tenant, type and period start. Periods are those of `tz`, cut to the range.

        Raises Forbidden without usage:read or for a tenant outside the key's, InvalidInput
        (naming the parameter) for an unknown period or zone, `start` after `end`, or more
        than 10,000 periods; StoreUnavailable when events kept arriving in the range through
        every attempt to read a consistent pair of figures and digests.
        """
        principal.require(Scope.USAGE_READ)
        if tenant is not None:
            principal.require_tenant(tenant)
        bounds = windows.periods(start, end, period, windows.zone(tz))
        if not bounds:
            return []
        if tenant is not None:
            tenants = [tenant]
        elif principal.tenants is not None:
            tenants = sorted(set(principal.tenants))
        else:
            tenants = sorted(t.id for t in self._store.list_tenants())
        found: list[ReconciliationRow] = []
        for each in tenants:
            found.extend(self._tenant_rows(each, bounds))
        # Sorted here, not by the database: the same order on every store and collation.
        found.sort(key=lambda row: (row.tenant, row.type, row.period_start))
        return found

    def _tenant_rows(
        self, tenant: str, bounds: Sequence[tuple[datetime, datetime]]
    ) -> list[ReconciliationRow]:
        """The rows of one tenant: one tenant at a time, so that both reads walk the
        (tenant, time) index instead of every tenant's events once per period."""
        filters = ExportFilter(tenant=tenant, time_from=bounds[0][0], time_to=bounds[-1][1])
        for _ in range(ATTEMPTS):
            figures = self._store.period_figures(filters, bounds)
            digests = self._digests(tenant, bounds) if figures else {}
            if _consistent(figures, digests):
                break
        else:
            raise StoreUnavailable(
                "Events kept arriving in this range while it was read; ask again."
            )
        if not figures:
            return []
        registered = self._store.get_tenants([tenant]).get(tenant)
        assert registered is not None  # noqa: S101 - events exist only for registered tenants
        now = self._clock()
        rows: list[ReconciliationRow] = []
        for figure in figures:
            period_start, period_end = bounds[figure.period]
            becomes_final = final_at(period_end, registered.lateness_hours)
            accumulator, _ = digests[(figure.type, figure.period)]
            rows.append(
                ReconciliationRow(
                    tenant=figure.tenant,
                    type=figure.type,
                    period_start=period_start,
                    period_end=period_end,
                    count=figure.count,
                    sum=figure.sum,
                    digest=accumulator.hexdigest(),
                    last_received_at=figure.last_received_at,
                    cancelled_count=figure.cancelled_count,
                    cancelled_sum=figure.cancelled_sum,
                    final=now >= becomes_final,
                    final_at=becomes_final,
                )
            )
        return rows

    def _digests(
        self, tenant: str, bounds: Sequence[tuple[datetime, datetime]]
    ) -> dict[_Key, tuple[DigestAccumulator, int]]:
        """Each (type, period)'s accumulator of the tenant and how many of its events are
        cancelled, walking the events page by page."""
        starts = [start for start, _ in bounds]
        found: dict[_Key, tuple[DigestAccumulator, int]] = {}
        after: tuple[datetime, str, str] | None = None
        while True:
            page = self._store.read_in_time_order(
                tenant, time_from=bounds[0][0], time_to=bounds[-1][1], after=after, limit=self._page
            )
            events = opened(self._keys, [event for event, _ in page])
            for event, (_, cancelled) in zip(events, page, strict=True):
                key = (event.type, bisect_right(starts, event.time) - 1)
                accumulator, gone = found.setdefault(key, (DigestAccumulator(), 0))
                accumulator.add_hash(digest_hash(event, cancelled))
                if cancelled:
                    found[key] = (accumulator, gone + 1)
            if len(page) < self._page:
                return found
            last = events[-1]
            after = (last.time, last.application, last.id)


def _consistent(
    figures: Sequence[PeriodFigures], digests: dict[_Key, tuple[DigestAccumulator, int]]
) -> bool:
    """Whether the two reads saw the same events. Events are only ever added and
    cancellations too, so the later read holds a superset of the earlier's: equal numbers of
    events and of cancelled events per row mean equal sets."""
    if len(figures) != len(digests):
        return False
    for figure in figures:
        found = digests.get((figure.type, figure.period))
        if found is None:
            return False
        accumulator, gone = found
        if accumulator.count != figure.count + figure.cancelled_count:
            return False
        if gone != figure.cancelled_count:
            return False
    return True
