"""A tenant's data key as stored (crypto/tenant_keys.py makes, wraps and shreds them).

This module imports nothing of the store: the store's contracts import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class DataKey:
    """A tenant's data key as stored: wrapped by the master key `master_key_id`. Once the
    tenant is shredded, `wrapped` and `master_key_id` are None for good."""

    tenant: str
    master_key_id: str | None
    wrapped: bytes | None
    created_at: datetime
    shredded_at: datetime | None
