"""What an operator sends to register things; shared by the API and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tally.auth.service import Scope
from tally.events.validation import Name, Rfc3339, Text

_INPUT = ConfigDict(extra="forbid", frozen=True)

MAX_LATENESS_HOURS = 35 * 24
MAX_GRACE_SECONDS = 30 * 24 * 3600


class TenantIn(BaseModel):
    model_config = _INPUT

    id: Name
    name: Text | None = None
    region: Name | None = Field(default=None, description="Home region; the server's by default.")
    lateness_hours: int = Field(default=72, ge=1, le=MAX_LATENESS_HOURS, strict=True)


def _integer_only(schema: dict[str, Any]) -> None:
    """The schema of an optional field that may be left out but never sent as null."""
    (integer,) = (option for option in schema.pop("anyOf") if option.get("type") != "null")
    schema.pop("default", None)
    schema.update(integer)


class TenantPatch(BaseModel):
    """A JSON merge patch (RFC 7396) of a tenant: the fields sent change, the others stay;
    `"name": null` removes the name. The id and region never change."""

    model_config = _INPUT

    name: Text | None = Field(default=None, description="The new display name; null removes it.")
    lateness_hours: int | None = Field(
        default=None,
        ge=1,
        le=MAX_LATENESS_HOURS,
        strict=True,
        description="The new lateness window; it applies to events sent from now on.",
        json_schema_extra=_integer_only,
    )

    @field_validator("lateness_hours")
    @classmethod
    def _window_is_not_removed(cls, value: int | None) -> int:
        # Runs only for a value sent (defaults are not validated): null is refused, absent is not.
        if value is None:
            raise ValueError("cannot be null: every tenant has a lateness window")
        return value


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


class RotateIn(BaseModel):
    model_config = _INPUT

    grace_seconds: int = Field(
        ge=0,
        le=MAX_GRACE_SECONDS,
        strict=True,
        description="How long the old key keeps working (0: it stops at once; at most 30 days).",
    )


class TenantOut(BaseModel):
    id: str
    name: str | None
    region: str
    lateness_hours: int
    created_at: datetime
    shredded: bool = Field(
        default=False, description="Its data key is destroyed: it takes no more events."
    )


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
    last_used_at: datetime | None = Field(description="Last authenticated use, to a minute.")
    rotated_from: str | None = Field(description="The key this one replaced by rotation.")
    replaced_by: str | None = Field(description="The key that replaced this one by rotation.")


class NewKeyOut(KeyOut):
    key: str = Field(description="The secret. Shown only in this response: store it now.")


class AuditQuery(BaseModel):
    """Which audit entries to list (query parameters of GET /v1/audit, options of the CLI)."""

    # Unknown query parameters are ignored, as on every other GET route.
    model_config = ConfigDict(frozen=True)

    action: str | None = Field(
        default=None, pattern=r"^[a-z][a-z0-9_.]{0,63}$", description="e.g. key.rotate"
    )
    actor: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:@-]{1,128}$",
        description="A key id, or cli:<OS user>",
    )
    since: Rfc3339 | None = Field(default=None, description="Entries at or after this time")
    cursor: str | None = Field(
        default=None, max_length=32, description="A previous page's next_cursor"
    )
    limit: int = Field(default=100, ge=1, le=1000)


class AuditOut(BaseModel):
    """One administrative action: who (`actor`: a key id or `cli:<OS user>`), what (`action`
    on `target`, with non-secret `details`), when (`at`) and from where (`source`: the client
    address or `cli`), and the `request_id` of the API request that did it."""

    seq: int
    at: datetime
    actor: str
    action: str
    target: str | None
    details: dict[str, Any]
    source: str
    request_id: str | None


class AuditPageOut(BaseModel):
    entries: list[AuditOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for older entries.")
    has_more: bool
