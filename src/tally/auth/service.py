"""Who a request acts as, and what that allows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from tally.auth import keys
from tally.errors import Forbidden, Unauthenticated
from tally.store.interface import EventStore, KeyRecord


class Scope(StrEnum):
    ADMIN = "admin"
    EVENTS_WRITE = "events:write"
    EVENTS_READ = "events:read"
    USAGE_READ = "usage:read"


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    scopes: frozenset[Scope]
    application: str | None
    tenants: tuple[str, ...] | None

    def require(self, scope: Scope) -> None:
        """Raises Forbidden unless the key holds `scope`. Scopes do not imply each other."""
        if scope not in self.scopes:
            raise Forbidden(f"This key lacks the '{scope}' scope.")

    def may_serve(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def require_tenant(self, tenant: str) -> None:
        if not self.may_serve(tenant):
            raise Forbidden("This key is not allowed for this tenant.")

    @classmethod
    def of(cls, record: KeyRecord) -> Principal:
        return cls(
            key_id=record.id,
            scopes=frozenset(Scope(s) for s in record.scopes),
            application=record.application,
            tenants=record.tenants,
        )


class Authenticator:
    def __init__(self, store: EventStore, *, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer` header.

        Raises Unauthenticated, with one message, for a missing, malformed, unknown, expired
        or revoked key, so that a caller cannot tell which.
        """
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not keys.well_formed(secret):
            raise Unauthenticated
        record = self._store.find_key(keys.secret_hash(secret))
        if record is None or record.revoked_at is not None:
            raise Unauthenticated
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise Unauthenticated
        return Principal.of(record)
