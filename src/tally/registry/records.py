"""Tenants and applications as stored (registry/service.py registers them).

This module imports nothing of the store: the store's contracts import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str | None
    region: str
    lateness_hours: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Application:
    id: str
    name: str | None
    created_at: datetime
