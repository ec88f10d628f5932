"""Who a request acts as, and what that allows."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import structlog

from tally.auth import keys
from tally.auth.records import KeyRecord
from tally.errors import Forbidden, TallyError, Unauthenticated
from tally.store.interface import Registrations

log = structlog.get_logger(__name__)

TOUCH_EVERY = timedelta(minutes=1)  # how stale a key's last_used_at may be


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
    """Turns an `Authorization` header into a principal, and notes when each key was used.

    Lookup and comparison: a key is looked up by the SHA-256 of the presented secret (a unique
    index), then the stored hash is compared with the presented one by `hmac.compare_digest`.
    Looking up by the hash is already safe against timing: what the index compares is a hash
    the caller cannot steer byte by byte, so the time a lookup takes says nothing about any
    stored secret. The constant-time comparison after it makes the decision itself independent
    of how the store matched (a collation, a prefix index, a future lookup by a public key id):
    a key is accepted only if its full hash equals the stored one. A separate public key-id
    prefix in the key would change its format and every issued key for no gain here, so keys
    stay as they are.

    `last_used_at` is written at most once per `touch_every` per key by this process (an
    in-memory note of the last write), and the UPDATE itself is conditional on the stored time
    being older than that, so several processes together write a key's row about once per
    interval, never once per request. A failed write is logged and ignored: recording a use
    must never fail the request that used the key.
    """

    def __init__(
        self,
        store: Registrations,
        *,
        clock: Callable[[], datetime],
        touch_every: timedelta = TOUCH_EVERY,
    ) -> None:
        self._store = store
        self._clock = clock
        self._touch_every = touch_every
        # key id -> when this process last wrote its last_used_at. Races between threads only
        # cost an extra conditional UPDATE, so no lock is taken on the request path.
        self._touched: dict[str, datetime] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer` header.

        Raises Unauthenticated, with one message, for a missing, malformed, unknown, expired
        or revoked key (a rotated key after its grace is an expired one), so that a caller
        cannot tell which. Raises StoreUnavailable when the store cannot be read.
        """
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not keys.well_formed(secret):
            raise Unauthenticated
        presented = keys.secret_hash(secret)
        record = self._store.find_key(presented)
        if record is None or not hmac.compare_digest(record.secret_hash, presented):
            raise Unauthenticated
        now = self._clock()
        if not record.usable_at(now):
            raise Unauthenticated
        self._note_use(record.id, now)
        return Principal.of(record)

    def _note_use(self, key_id: str, now: datetime) -> None:
        last = self._touched.get(key_id)
        if last is not None and now - last < self._touch_every:
            return
        self._touched[key_id] = now
        try:
            self._store.touch_key(key_id, at=now, every=self._touch_every)
        except TallyError as error:
            # Forget the note so the next request tries again.
            self._touched.pop(key_id, None)
            log.warning("key_use_not_recorded", key_id=key_id, error_type=type(error).__name__)
