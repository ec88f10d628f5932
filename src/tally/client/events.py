"""Events as the SDK reports them: a stable id and frozen content at the moment of `report`."""

from __future__ import annotations

import dataclasses
import secrets
import time as clock
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tally.events.jsontext import exact_json

AttributeValue = str | int | float | bool


@dataclass(frozen=True, kw_only=True)
class Event:
    """One billable event. `quantity` is exact: a Decimal, an int or a plain decimal string
    (`"12.5"`); a float is refused with TypeError, since most decimals have no float. `time`
    is an aware datetime or RFC 3339 text; None means the moment of `report`. `id` is the
    idempotency key; None means the SDK assigns one when the event is reported."""

    tenant: str
    type: str
    quantity: Decimal | str | int
    time: datetime | str | None = None
    subject: str | None = None
    unit: str | None = None
    attributes: Mapping[str, AttributeValue] | None = None
    id: str | None = None


def new_id() -> str:
    """A UUIDv7 (RFC 9562) as 32 hex digits: unique, and ordered by time, which keeps the
    store's index on (application, id) appending rather than scattering."""
    millis = clock.time_ns() // 1_000_000
    value = (millis & (2**48 - 1)) << 80 | 0x7 << 76 | secrets.randbits(12) << 64
    value |= 0b10 << 62 | secrets.randbits(62)
    return f"{value:032x}"


def rfc3339(moment: datetime) -> str:
    """An aware datetime as RFC 3339 in UTC with microseconds (`…T12:00:00.000000Z`)."""
    if moment.utcoffset() is None:
        raise ValueError("a naive datetime names no instant: give it a tzinfo (e.g. UTC)")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def exact_quantity(value: object) -> str | object:
    """A quantity for the wire: a Decimal or int as a plain decimal string, text as it is.

    Raises TypeError for a float (or a bool): converting one would send a value other than
    the caller meant (0.1 is 0.1000000000000000055…), so the SDK refuses rather than guess.
    Anything else is sent as given, for Tally to judge (and reject, handing the event back).
    """
    if isinstance(value, bool | float):
        raise TypeError(
            f"quantity must be a Decimal, an int or a decimal string, not {type(value).__name__}"
            " (a float cannot hold most decimals exactly: pass Decimal('0.1') or '0.1')"
        )
    if isinstance(value, Decimal):
        # 'f' writes every digit and never an exponent, which a string quantity may not hold.
        return format(value, "f")
    if isinstance(value, int):
        return str(value)
    return value


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"{type(value).__name__} cannot be sent as JSON")


def encode(event: Event | Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
    """(the event as sent, its JSON bytes), with its id and time fixed now, so that every
    retry sends the same content and Tally answers `duplicate`, never a conflict.

    Raises TypeError for a float quantity or a value JSON cannot carry, ValueError for a
    naive datetime or a NaN.
    """
    if isinstance(event, Event):
        fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
        wire = {name: value for name, value in fields.items() if value is not None}
    elif isinstance(event, Mapping):
        wire = dict(event)
    else:
        raise TypeError(f"report() takes an Event or a mapping, not {type(event).__name__}")
    if wire.get("id") is None:
        wire["id"] = new_id()
    if "quantity" in wire:
        wire["quantity"] = exact_quantity(wire["quantity"])
    moment = wire.get("time")
    if moment is None:
        wire["time"] = rfc3339(datetime.now(UTC))
    elif isinstance(moment, datetime):
        wire["time"] = rfc3339(moment)
    if isinstance(wire.get("attributes"), Mapping):
        wire["attributes"] = dict(wire["attributes"])
    # Numeric attributes go out as the exact numbers they are (never through a float).
    body = exact_json(wire, default=_json_default).encode()
    return wire, body
