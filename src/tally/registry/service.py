"""Registering tenants and applications and issuing and revoking keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from tally.auth import keys
from tally.auth.service import Scope
from tally.errors import FieldError, InvalidInput, NotFound
from tally.registry.models import ApplicationIn, KeyIn, KeyOut, NewKeyOut, TenantIn
from tally.store.interface import Application, EventStore, KeyRecord, Tenant


def describe_key(record: KeyRecord) -> KeyOut:
    return KeyOut(
        id=record.id,
        scopes=list(record.scopes),
        application=record.application,
        tenants=list(record.tenants) if record.tenants is not None else None,
        created_at=record.created_at,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
    )


@dataclass
class Registry:
    store: EventStore
    region: str
    clock: Callable[[], datetime]

    def create_tenant(self, spec: TenantIn) -> Tenant:
        """Raises AlreadyExists if the id is taken."""
        tenant = Tenant(
            id=spec.id,
            name=spec.name,
            region=spec.region or self.region,
            lateness_hours=spec.lateness_hours,
            created_at=self.clock(),
        )
        self.store.create_tenant(tenant)
        return tenant

    def create_application(self, spec: ApplicationIn) -> Application:
        """Raises AlreadyExists if the id is taken."""
        application = Application(id=spec.id, name=spec.name, created_at=self.clock())
        self.store.create_application(application)
        return application

    def create_key(self, spec: KeyIn) -> NewKeyOut:
        """Issue a key; its secret is in the result and nowhere else.

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
        self.store.create_key(record)
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

    def revoke_key(self, key_id: str) -> None:
        """Revoked at once, for every replica. Raises NotFound."""
        if not self.store.revoke_key(key_id, at=self.clock()):
            raise NotFound("There is no key with this id.")

    def bootstrap_admin_key(self) -> NewKeyOut | None:
        """On a store without any key, issue the first admin key; otherwise None."""
        if self.store.count_keys() > 0:
            return None
        return self.create_key(KeyIn(scopes=[Scope.ADMIN]))
