"""What an operator sends to register things; shared by the API and the CLI."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from tally.auth.service import Scope
from tally.events.validation import Name, Rfc3339, Text

_INPUT = ConfigDict(extra="forbid", frozen=True)

MAX_LATENESS_HOURS = 35 * 24


class TenantIn(BaseModel):
    model_config = _INPUT

    id: Name
    name: Text | None = None
    region: Name | None = Field(default=None, description="Home region; the server's by default.")
    lateness_hours: int = Field(default=72, ge=1, le=MAX_LATENESS_HOURS, strict=True)


class ApplicationIn(BaseModel):
    model_config = _INPUT

    id: Name
    name: Text | None = None


class KeyIn(BaseModel):
    model_config = _INPUT

    scopes: list[Scope] = Field(min_length=1, max_length=4)
    application: Name | None = Field(
        default=None, description="Required with events:write: the application it reports as."
    )
    tenants: list[Name] | None = Field(
        default=None, min_length=1, max_length=1000, description="Restrict the key to these."
    )
    expires_at: Rfc3339 | None = None


class TenantOut(BaseModel):
    id: str
    name: str | None
    region: str
    lateness_hours: int
    created_at: datetime


class ApplicationOut(BaseModel):
    id: str
    name: str | None
    created_at: datetime


class KeyOut(BaseModel):
    """A key's description. Its secret is never part of it."""

    id: str
    scopes: list[str]
    application: str | None
    tenants: list[str] | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class NewKeyOut(KeyOut):
    key: str = Field(description="The secret. Shown only in this response: store it now.")
