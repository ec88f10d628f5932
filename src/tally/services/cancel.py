"""Cancellations: withdrawing an event reported in error, while its periods are not final.

A cancellation is an entry of its own in the export log (store `EventLog.cancel`), never a
change to the event: the event stays exported as it was, and a later entry says it is
cancelled. Usage and reconciliation leave cancelled events out of their figures through the
store's one `not_cancelled` predicate (store/plan.py).

The rules:
- a key with `events:write` cancels its own application's events (of its tenants, if it is
  restricted); another application's event is the same 404 as an unknown one, so a key learns
  nothing about ids it may not touch. An `admin` key cancels any event.
- only while `now < event.time + the tenant's lateness window`: the rule ingest applies to a
  new event. Every period that contains the event ends after `event.time`, so it is final
  only after that moment (docs/reconciliation.md): no final period can ever change. Later:
  409 /problems/period-final, saying since when.
- the same reason again returns the cancellation stored (idempotent, even after the period
  became final); another reason for a cancelled event is a 409 naming the cancellation.
- a shredded tenant's events are not cancelled (409): the reason would be sealed under the
  tenant's data key, which is destroyed, and a shredded tenant's figures are kept as they
  were erased.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from tally.auth.service import Principal, Scope
from tally.crypto.sealing import TenantCipher
from tally.crypto.tenant_keys import TenantKeys
from tally.errors import Conflict, FieldError, NotFound, PeriodFinal
from tally.events.model import Cancellation, format_time
from tally.services.export import open_reason
from tally.store.interface import DataKeys, EventLog

_NO_EVENT = "There is no event with this application and id."


class CancelStore(EventLog, DataKeys, Protocol):
    """The events and their cancellations, and the tenants' lateness and data keys."""


def final_at(event_time: datetime, lateness_hours: int) -> datetime:
    """When every period containing an event at `event_time` is final, at the latest: the
    moment after which neither ingest nor a cancellation may touch it."""
    return event_time + timedelta(hours=lateness_hours)


class CancelService:
    def __init__(
        self, *, store: CancelStore, keys: TenantKeys, clock: Callable[[], datetime]
    ) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock

    def cancel(
        self, principal: Principal, application: str, event_id: str, reason: str
    ) -> Cancellation:
        """Cancel the event (application, event_id) for `reason`; the cancellation, reason
        opened. See the module's rules. Raises Forbidden without `events:write` or `admin`,
        NotFound, PeriodFinal, Conflict; StoreUnavailable (nothing stored, or the
        cancellation stored and a retry returns it)."""
        admin = Scope.ADMIN in principal.scopes
        if not admin:
            principal.require(Scope.EVENTS_WRITE)
            if principal.application != application:
                raise NotFound(_NO_EVENT)
        event = self._store.get_event(application, event_id)
        if event is None or not principal.may_serve(event.tenant):
            raise NotFound(_NO_EVENT)
        found = self._store.tenants_with_keys([event.tenant])
        tenant, key = found[event.tenant]
        cipher = self._keys.ciphers({tenant.id: key})[tenant.id]
        stored = self._store.get_cancellation(application, event_id)
        if stored is not None:
            return _same(stored, reason, cipher)
        if cipher is None:
            raise Conflict(
                "The event's tenant was shredded: its events are no longer cancelled.",
                [FieldError("", "belongs to a shredded tenant", parameter="application")],
            )
        now = self._clock()
        final = final_at(event.time, tenant.lateness_hours)
        if now >= final:
            raise PeriodFinal(
                f"The event's periods became final at {format_time(final)} (its time plus "
                f"the tenant's lateness window of {tenant.lateness_hours} hours): their "
                "figures never change, so the event can no longer be cancelled."
            )
        sealed = cipher.seal_reason(application=application, event_id=event_id, reason=reason)
        entry = Cancellation(
            application=application,
            id=event_id,
            tenant=event.tenant,
            sealed_reason=sealed,
            received_at=now,
        )
        stored, created = self._store.cancel(entry)
        if not created:  # another request cancelled it between our read and our write
            return _same(stored, reason, cipher)
        stored.reason = reason
        return stored


def _same(stored: Cancellation, reason: str, cipher: TenantCipher | None) -> Cancellation:
    """The stored cancellation, if it is for `reason`; Conflict naming it otherwise."""
    open_reason(stored, cipher)
    if stored.reason != reason:
        raise Conflict(
            f"The event was cancelled already, at {format_time(stored.received_at)}, for "
            "another reason: a cancellation is never changed.",
            [FieldError("/reason", "differs from the reason the event was cancelled for")],
        )
    return stored
