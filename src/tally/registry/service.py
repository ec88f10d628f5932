"""Registering tenants and applications; issuing, rotating and revoking keys; the audit log.

Every administrative action here is recorded in the audit log by the store, in the same
transaction as the action, with the `Actor` the caller names (the API's key and client address,
or the CLI's OS user).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta

from tally.auth import keys
from tally.auth.records import KeyRecord
from tally.auth.service import Scope
from tally.crypto.records import DataKey
from tally.errors import Conflict, FieldError, InvalidInput, NotFound, PeriodFinal
from tally.events.model import format_time
from tally.freshness import Freshness
from tally.registry.audit import SYSTEM, Actor, AuditFilter, DenialLog, JsonValue
from tally.registry.models import (
    MAX_GRACE_SECONDS,
    ApplicationIn,
    AuditOut,
    AuditPageOut,
    AuditQuery,
    KeyIn,
    KeyOut,
    NewKeyOut,
    TenantIn,
    TenantOut,
    TenantPatch,
)
from tally.registry.records import Application, Tenant
from tally.store.interface import RegistryStore


def describe_key(record: KeyRecord) -> KeyOut:
    return KeyOut(
        id=record.id,
        scopes=list(record.scopes),
        application=record.application,
        tenants=list(record.tenants) if record.tenants is not None else None,
        created_at=record.created_at,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
        last_used_at=record.last_used_at,
        rotated_from=record.rotated_from,
        replaced_by=record.replaced_by,
    )


def _key_details(record: KeyRecord) -> dict[str, JsonValue]:
    """What the audit log keeps of a key: its bindings, never its secret or hash."""
    return {
        "scopes": list(record.scopes),
        "application": record.application,
        "tenants": list(record.tenants) if record.tenants is not None else None,
        "expires_at": format_time(record.expires_at) if record.expires_at else None,
    }


def _shredded(key: DataKey | None) -> bool:
    return key is not None and key.shredded_at is not None


@dataclass
class Registry:
    store: RegistryStore
    region: str
    clock: Callable[[], datetime]
    # Bumped after every change to a key or a tenant through this registry, so that this
    # process's copies of them (freshness.py) are never older than its own changes.
    freshness: Freshness = field(default_factory=lambda: Freshness(0))
    denials: DenialLog = field(init=False)

    def __post_init__(self) -> None:
        self.denials = DenialLog(self.store.record_audit, self.clock)

    def create_tenant(self, spec: TenantIn, *, actor: Actor = SYSTEM) -> Tenant:
        """Raises AlreadyExists if the id is taken (and records nothing)."""
        tenant = Tenant(
            id=spec.id,
            name=spec.name,
            region=spec.region or self.region,
            lateness_hours=spec.lateness_hours,
            created_at=self.clock(),
        )
        # The display name stays out of the log: it is free text an operator typed.
        details: dict[str, JsonValue] = {
            "region": tenant.region,
            "lateness_hours": tenant.lateness_hours,
        }
        audit = actor.entry(
            "tenant.create", at=tenant.created_at, target=tenant.id, details=details
        )
        self.store.create_tenant(tenant, audit=audit)
        return tenant

    def list_tenants(self) -> list[TenantOut]:
        """Every tenant as the API and the CLI show them: with whether it is shredded."""
        tenants = self.store.list_tenants()
        found = self.store.tenants_with_keys([tenant.id for tenant in tenants])
        return [
            TenantOut(
                **asdict(tenant), shredded=tenant.id in found and _shredded(found[tenant.id][1])
            )
            for tenant in tenants
        ]

    def get_tenant(self, tenant_id: str) -> TenantOut:
        """Raises NotFound if there is no such tenant."""
        found = self.store.tenants_with_keys([tenant_id]).get(tenant_id)
        if found is None:
            raise NotFound("There is no tenant with this id.")
        tenant, key = found
        return TenantOut(**asdict(tenant), shredded=_shredded(key))

    def update_tenant(
        self, tenant_id: str, patch: TenantPatch, *, actor: Actor = SYSTEM
    ) -> TenantOut:
        """Apply a merge patch: the fields `patch` holds change, the others stay. Recorded as
        `tenant.update` with the old and new window (the name is free text an operator typed,
        so the log says only that it changed). A window changed applies to events sent from
        now on: stored events stay, whatever their time.

        Raises NotFound if there is no such tenant; PeriodFinal for a longer window (it would
        re-open final periods); Conflict if it kept changing under us.
        """
        for _ in range(3):  # a concurrent update moved it between our read and our write
            old = self.store.get_tenants([tenant_id]).get(tenant_id)
            if old is None:
                raise NotFound("There is no tenant with this id.")
            new = replace(old, **patch.model_dump(exclude_unset=True))
            if new == old:
                return self.get_tenant(tenant_id)
            if new.lateness_hours > old.lateness_hours:
                raise PeriodFinal(
                    "A tenant's lateness window can be shortened, never lengthened: a longer "
                    "one would let events into periods that are final already, whose figures "
                    "never change (docs/reconciliation.md).",
                    [FieldError("/lateness_hours", f"must be at most {old.lateness_hours}")],
                )
            details: dict[str, JsonValue] = {
                "old_lateness_hours": old.lateness_hours,
                "new_lateness_hours": new.lateness_hours,
                "name_changed": new.name != old.name,
            }
            audit = actor.entry("tenant.update", at=self.clock(), target=old.id, details=details)
            with self._changing():
                updated = self.store.update_tenant(old, new, audit=audit)
            if updated:
                return self.get_tenant(tenant_id)
        raise Conflict("This tenant is being changed by someone else; look at it again.")

    def shred_tenant(self, tenant_id: str, *, actor: Actor = SYSTEM) -> None:
        """Destroy the tenant's data key (crypto/tenant_keys.py): its sealed attributes are
        unreadable from now on wherever they are kept, its exports say `shredded`, and it
        takes no more events. Irreversible; shredding twice changes nothing more.

        Raises NotFound if there is no such tenant.
        """
        now = self.clock()
        audit = actor.entry("tenant.shred", at=now, target=tenant_id)
        with self._changing():
            shredded = self.store.shred_data_key(tenant_id, at=now, audit=audit)
        if not shredded:
            raise NotFound("There is no tenant with this id.")

    def create_application(self, spec: ApplicationIn, *, actor: Actor = SYSTEM) -> Application:
        """Raises AlreadyExists if the id is taken (and records nothing)."""
        application = Application(id=spec.id, name=spec.name, created_at=self.clock())
        audit = actor.entry("application.create", at=application.created_at, target=spec.id)
        self.store.create_application(application, audit=audit)
        return application

    def create_key(self, spec: KeyIn, *, actor: Actor = SYSTEM) -> NewKeyOut:
        """Issue a key; its secret is in the result and nowhere else (the log has its id).

        Raises InvalidInput when the scopes and bindings do not fit together or name an
        unknown application or tenant.
        """
        now = self.clock()
        problems = self._key_problems(spec, now)
        if problems:
            raise InvalidInput("The key cannot be issued as asked.", problems)
        secret = keys.new_secret()
        record = KeyRecord(
            id=keys.new_key_id(),
            secret_hash=keys.secret_hash(secret),
            scopes=tuple(dict.fromkeys(spec.scopes)),
            application=spec.application,
            tenants=tuple(dict.fromkeys(spec.tenants)) if spec.tenants is not None else None,
            created_at=now,
            expires_at=spec.expires_at,
            revoked_at=None,
        )
        audit = actor.entry("key.create", at=now, target=record.id, details=_key_details(record))
        self.store.create_key(record, audit=audit)
        return NewKeyOut(**describe_key(record).model_dump(), key=secret)

    def _key_problems(self, spec: KeyIn, now: datetime) -> list[FieldError]:
        problems: list[FieldError] = []
        writes = Scope.EVENTS_WRITE in spec.scopes
        if writes and spec.application is None:
            problems.append(FieldError("/application", "is required with the events:write scope"))
        if not writes and spec.application is not None:
            problems.append(FieldError("/application", "is only for keys with events:write"))
        if Scope.ADMIN in spec.scopes and len(set(spec.scopes)) > 1:
            problems.append(FieldError("/scopes", "admin keys carry no other scope"))
        if Scope.ADMIN in spec.scopes and spec.tenants is not None:
            problems.append(FieldError("/tenants", "admin keys are not restricted to tenants"))
        if spec.application is not None and self.store.get_application(spec.application) is None:
            problems.append(FieldError("/application", "is not a registered application"))
        if spec.tenants is not None:
            known = self.store.get_tenants(spec.tenants)
            problems.extend(
                FieldError(f"/tenants/{i}", "is not a registered tenant")
                for i, tenant in enumerate(spec.tenants)
                if tenant not in known
            )
        if spec.expires_at is not None and spec.expires_at <= now:
            problems.append(FieldError("/expires_at", "must be in the future"))
        return problems

    def rotate_key(self, key_id: str, *, grace: timedelta, actor: Actor = SYSTEM) -> NewKeyOut:
        """Issue a replacement for a key and retire the old one after `grace`.

        The new key has the old one's scopes, application and tenants, and the same lifetime
        (`expires_at - created_at`) counted from now, or no expiry if the old one had none. Its
        secret is in the result only. The old key keeps working until now + `grace` (0: not
        at all), never longer than it would have anyway; after that it gets the same 401 as
        any invalid key. Both keys point at each other (`replaced_by`, `rotated_from`).

        Raises NotFound for an unknown key; InvalidInput when `grace` is negative or over 30
        days; Conflict (409) when the key is revoked, expired or already rotated.
        """
        if not timedelta(0) <= grace <= timedelta(seconds=MAX_GRACE_SECONDS):
            raise InvalidInput(
                "The grace period must be between 0 and 30 days.",
                [FieldError("/grace_seconds", "must be between 0 and 2592000")],
            )
        now = self.clock()
        old = self.store.get_key(key_id)
        if old is None:
            raise NotFound("There is no key with this id.")
        self._require_rotatable(old, now)
        lifetime = old.expires_at - old.created_at if old.expires_at is not None else None
        secret = keys.new_secret()
        new = KeyRecord(
            id=keys.new_key_id(),
            secret_hash=keys.secret_hash(secret),
            scopes=old.scopes,
            application=old.application,
            tenants=old.tenants,
            created_at=now,
            expires_at=now + lifetime if lifetime is not None else None,
            revoked_at=None,
            rotated_from=old.id,
        )
        retire_at = now + grace
        if old.expires_at is not None:
            retire_at = min(retire_at, old.expires_at)
        audit = actor.entry(
            "key.rotate",
            at=now,
            target=old.id,
            details={
                "replaced_by": new.id,
                "grace_seconds": int(grace.total_seconds()),
                "old_expires_at": format_time(retire_at),
                "new_expires_at": format_time(new.expires_at) if new.expires_at else None,
            },
        )
        with self._changing():
            rotated = self.store.rotate_key(
                old.id, new=new, old_expires_at=retire_at, now=now, audit=audit
            )
        if not rotated:
            # Revoked, expired or rotated between our read and the store's conditional update.
            current = self.store.get_key(key_id)
            if current is not None:
                self._require_rotatable(current, now)
            raise Conflict("This key changed while it was being rotated; look at it again.")
        return NewKeyOut(**describe_key(new).model_dump(), key=secret)

    @staticmethod
    def _require_rotatable(record: KeyRecord, now: datetime) -> None:
        if record.revoked_at is not None:
            raise Conflict("This key is revoked and cannot be rotated; issue a new key instead.")
        if record.replaced_by is not None:
            raise Conflict(f"This key was rotated already; rotate {record.replaced_by} instead.")
        if not record.usable_at(now):
            raise Conflict("This key has expired and cannot be rotated; issue a new key instead.")

    def revoke_key(self, key_id: str, *, actor: Actor = SYSTEM, force: bool = False) -> None:
        """Revoked at once, for every replica.

        Raises NotFound, or LastAdminKey (409) when no other admin key would stay valid, an
        operator locked out of the API being one mistake away otherwise; in both cases it
        records nothing. `force` (the host's CLI only: `tally keys create --scope admin`
        there is the recovery) revokes anyway, and the audit entry says so.
        """
        now = self.clock()
        audit = actor.entry(
            "key.revoke", at=now, target=key_id, details={"forced": True} if force else None
        )
        with self._changing():
            revoked = self.store.revoke_key(key_id, at=now, audit=audit, keep_an_admin=not force)
        if not revoked:
            raise NotFound("There is no key with this id.")

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Around a change to a key or tenant: this process's copies are stale after it,
        also when it failed (a lost COMMIT may have stored it)."""
        try:
            yield
        finally:
            self.freshness.changed()

    def bootstrap_admin_key(self, *, actor: Actor = SYSTEM) -> NewKeyOut | None:
        """On a store without any key, issue the first admin key; otherwise None."""
        if self.store.count_keys() > 0:
            return None
        return self.create_key(KeyIn(scopes=[Scope.ADMIN]), actor=actor)

    # --- the audit log ------------------------------------------------------------------

    def audit(
        self,
        actor: Actor,
        action: str,
        *,
        target: str | None,
        details: dict[str, JsonValue] | None = None,
    ) -> None:
        """Record an action that is not one store transaction (e.g. a long re-encryption, at
        its start and end) or a refused attempt. An action that *is* one store transaction
        passes `audit=actor.entry(...)` to its store method instead, so that the entry and the
        action commit together. `details` must hold no secret and no attribute value.

        Raises StoreUnavailable when the entry cannot be written.
        """
        self.store.record_audit(
            actor.entry(action, at=self.clock(), target=target, details=details)
        )

    def deny(self, actor: Actor, *, route: str, method: str) -> None:
        """Record a refused admin attempt, coalesced (see `DenialLog`): a valid key refused
        in a loop must not flood the log. Never raises; `close` writes the counts held."""
        self.denials.deny(actor, route=route, method=method)

    def close(self) -> None:
        """Write what is still held in memory (the counts of refused attempts)."""
        self.denials.flush()

    def audit_page(self, query: AuditQuery) -> AuditPageOut:
        """Entries matching `query`, newest first; its `cursor` is a previous `next_cursor`.

        Raises InvalidInput for a cursor that is not one Tally handed out.
        """
        before: int | None = None
        if query.cursor is not None:
            cursor = query.cursor
            if not (cursor.isascii() and cursor.isdigit() and 0 < len(cursor) <= 18):
                raise InvalidInput(
                    "The cursor is not one Tally handed out.",
                    [FieldError("", "is not a valid cursor", parameter="cursor")],
                )
            before = int(cursor)
        filters = AuditFilter(
            action=query.action, actor=query.actor, since=query.since, before=before
        )
        # One row beyond the page says whether more follows.
        found = self.store.list_audit(filters, limit=query.limit + 1)
        page = found[: query.limit]
        has_more = len(found) > query.limit
        return AuditPageOut(
            entries=[AuditOut(**asdict(record)) for record in page],
            next_cursor=str(page[-1].seq) if has_more else None,
            has_more=has_more,
        )
