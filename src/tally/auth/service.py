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
from tally.freshness import FreshCache, Freshness
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

    Records found are kept in a `FreshCache` (freshness.py) for at most `freshness.seconds`,
    and dropped at once by any key change made through this process: a key revoked through
    another process is refused here within that bound. Expiry is judged on every request.
    """

    def __init__(
        self,
        store: Registrations,
        *,
        clock: Callable[[], datetime],
        touch_every: timedelta = TOUCH_EVERY,
        freshness: Freshness | None = None,
    ) -> None:
        self._store = store
        self._found: FreshCache[bytes, tuple[KeyRecord, Principal]] = FreshCache(
            freshness or Freshness(0)
        )
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
        secret = _secret(authorization)
        presented = keys.secret_hash(secret)
        found = self._found.get(presented)
        if found is None:
            if not keys.well_formed(secret):  # what is cached was, so it is checked here only
                raise Unauthenticated
            read_at, generation = self._found.stamp()
            record = self._store.find_key(presented)
            if record is None or not hmac.compare_digest(record.secret_hash, presented):
                raise Unauthenticated
            found = (record, Principal.of(record))
            self._found.put(presented, found, read_at=read_at, generation=generation)
        record, principal = found
        now = self._clock()
        if not record.usable_at(now):
            raise Unauthenticated
        self._note_use(record.id, now)
        return principal

    def cached(self, authorization: str | None) -> Principal | None:
        """`authenticate` answered from memory alone: None when that needs the store (the key
        is not cached, or its use is due to be written). Raises Unauthenticated as it does
        for a header that is not a bearer key, or a cached key not usable now."""
        found = self._found.get(keys.secret_hash(_secret(authorization)))
        if found is None:
            return None
        record, principal = found
        now = self._clock()
        if not record.usable_at(now):
            raise Unauthenticated
        last = self._touched.get(record.id)
        if last is None or now - last >= self._touch_every:
            return None
        return principal

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


def _secret(authorization: str | None) -> str:
    """The key an `Authorization: Bearer` header presents. Raises Unauthenticated for any
    other header."""
    scheme, _, secret = (authorization or "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret.isascii():  # keys are ASCII (auth/keys.py)
        raise Unauthenticated
    return secret
