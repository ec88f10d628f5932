"""The billing event (DAT-BILL-EVENT) as Tally holds it in memory.

Quantities are `Decimal` end to end; times are aware `datetime`s in UTC with microsecond
precision. Attributes are kept as their canonical JSON text so that what was hashed is exactly
what is stored and exported, and numbers in them never pass through a binary float.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


def format_decimal(value: Decimal) -> str:
    """Plain notation without exponent or trailing zeros: Decimal('1.50E+2') -> '150'."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC, fixed width, so that text order is time order (used by SQLite too)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Inverse of `format_time` (and of any ISO 8601 text with an offset)."""
    return datetime.fromisoformat(text).astimezone(UTC)


def canonical_json(value: dict[str, Any]) -> str:
    """Compact, key-sorted JSON in which `Decimal`s are written as exact number literals."""
    parts: list[str] = []
    for key in sorted(value):
        item = value[key]
        if isinstance(item, bool) or item is None:
            encoded = json.dumps(item)
        elif isinstance(item, Decimal):
            encoded = format_decimal(item)
        elif isinstance(item, int):
            encoded = str(item)
        elif isinstance(item, str):
            encoded = json.dumps(item, ensure_ascii=False)
        else:
            raise TypeError(f"attribute values are flat: {type(item).__name__}")
        parts.append(f"{json.dumps(key, ensure_ascii=False)}:{encoded}")
    return "{" + ",".join(parts) + "}"


def parse_attributes(text: str) -> dict[str, str | bool | Decimal]:
    parsed: dict[str, str | bool | Decimal] = json.loads(
        text, parse_float=Decimal, parse_int=Decimal
    )
    return parsed


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A validated event, ready to be appended. `region` comes from the tenant.

    `digest` is SHA-256 over a canonical form of everything the application sent: two reports
    of one identity are the same event exactly when their digests match (`1.0` equals `1`,
    `+02:00` equals the same instant in `Z`, attribute order is ignored).
    """

    application: str
    id: str
    tenant: str
    type: str
    quantity: Decimal
    time: datetime
    subject: str | None
    unit: str | None
    attributes_json: str
    region: str
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        canonical = canonical_json(
            {
                "tenant": self.tenant,
                "type": self.type,
                "quantity": self.quantity,
                "time": format_time(self.time),
                "subject": self.subject,
                "unit": self.unit,
                "attributes": self.attributes_json,
            }
        )
        object.__setattr__(self, "digest", hashlib.sha256(canonical.encode()).digest())

    @property
    def key(self) -> tuple[str, str]:
        return (self.application, self.id)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as exported: what was sent plus what Tally added."""

    application: str
    id: str
    tenant: str
    type: str
    quantity: Decimal
    time: datetime
    subject: str | None
    unit: str | None
    attributes_json: str
    region: str
    received_at: datetime

    def to_json(self) -> str:
        """The export representation. Attributes are spliced in as stored: never re-parsed."""
        head = {
            "id": self.id,
            "application": self.application,
            "tenant": self.tenant,
            "type": self.type,
            "quantity": format_decimal(self.quantity),
            "time": format_time(self.time),
            "subject": self.subject,
            "unit": self.unit,
            "region": self.region,
            "received_at": format_time(self.received_at),
        }
        body = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
        return f'{body[:-1]},"attributes":{self.attributes_json}}}'

    @property
    def attributes(self) -> dict[str, str | bool | Decimal]:
        return parse_attributes(self.attributes_json)
