"""The API key as stored, and the rule that keeps an admin key: records the store keeps for auth.

This module imports nothing of the store: the store's contracts (store/interface.py) and both
stores import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from tally.errors import LastAdminKey


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key as stored: its SHA-256, never the secret."""

    id: str
    secret_hash: bytes
    scopes: tuple[str, ...]
    application: str | None
    tenants: tuple[str, ...] | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = None  # to within a minute (see auth/service.py)
    rotated_from: str | None = None  # the key this one replaced by rotation
    replaced_by: str | None = None  # the key that replaced this one by rotation

    def usable_at(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now` (a key in its rotation grace is usable)."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


# The admin scope as stored (auth.service.Scope.ADMIN; kept here so the store needs no service).
ADMIN_SCOPE = "admin"
# Matches the JSON text of a scopes column that holds the admin scope (the same on both stores).
ADMIN_SCOPES_LIKE = f'%"{ADMIN_SCOPE}"%'


def refuse_last_admin(key_id: str, admins: Sequence[KeyRecord], now: datetime) -> None:
    """Raises LastAdminKey when revoking `key_id` at `now` would leave no admin key among
    `admins` (every admin key, read under the revocation's lock) that stays valid.

    A key that stays valid is neither revoked nor expired, and not retiring after a rotation
    (its replacement is the one that stays). Revoking a key that does not stay valid itself
    (revoked, expired, retiring, or not an admin key) takes nothing away and is never refused.
    """
    target = next((key for key in admins if key.id == key_id), None)
    if target is None or not _stays_valid(target, now):
        return
    if not any(key.id != key_id and _stays_valid(key, now) for key in admins):
        raise LastAdminKey


def _stays_valid(key: KeyRecord, now: datetime) -> bool:
    return ADMIN_SCOPE in key.scopes and key.usable_at(now) and key.replaced_by is None
