"""The billing event (DAT-BILL-EVENT) as Tally holds it in memory.

Quantities are `Decimal` end to end; times are aware `datetime`s in UTC with microsecond
precision. Attributes are kept as their canonical JSON text so that what was hashed is exactly
what is stored and exported, and numbers in them never pass through a binary float.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from enum import StrEnum
from typing import Any, Protocol


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


# Exact arithmetic for sums of decimals of any size: Decimal's default context rounds to 28
# digits, and Tally's quantities may have 38.
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)


def format_decimal(value: Decimal) -> str:
    """Plain notation without exponent or trailing zeros: Decimal('1.50E+2') -> '150'."""
    # str() is the plain notation already unless it writes an exponent, at half the cost of
    # format(value, "f"); both run for every event ingested.
    text = str(value)
    if "E" in text:
        text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


# format_time's text up to the minute, by (year, month, day, hour, minute): events of a
# batch, a day, a month share few minutes. Bounded: full, it starts afresh.
_MINUTES: dict[tuple[int, int, int, int, int], str] = {}
_MINUTES_KEPT = 4_096
_SECONDS = [f"{second:02d}." for second in range(60)]


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC, fixed width, so that text order is time order (used by SQLite too).

    Not `strftime("%Y…")`: glibc writes year 999 as `999`, which sorts after `2026` as text
    and is not RFC 3339. `isoformat` pads every year to four digits. It writes the minute,
    kept in `_MINUTES`; the seconds and microseconds are put after it, for a third of the
    cost of `isoformat` per call (it runs for every event ingested, twice on SQLite).
    """
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    minute = value.year, value.month, value.day, value.hour, value.minute
    head = _MINUTES.get(minute)
    if head is None:
        if len(_MINUTES) >= _MINUTES_KEPT:
            _MINUTES.clear()
        # "YYYY-MM-DDTHH:MM:" of "YYYY-MM-DDTHH:MM:SS.ffffff+00:00"
        head = _MINUTES[minute] = value.isoformat(timespec="microseconds")[:-15]
    return head + _SECONDS[value.second] + str(1_000_000 + value.microsecond)[1:] + "Z"


def parse_time(text: str) -> datetime:
    """Inverse of `format_time` (and of any ISO 8601 text with an offset)."""
    return datetime.fromisoformat(text).astimezone(UTC)


# What json.dumps(text, ensure_ascii=False) writes for a str, without building an encoder
# per call: the C function it ends in.
_json_string: Callable[[str], str] = json.encoder.encode_basestring


def canonical_value(item: object) -> str:
    """One flat value as canonical JSON: `Decimal`s as exact number literals."""
    if isinstance(item, str):
        return _json_string(item)
    if item is True:
        return "true"
    if item is False:
        return "false"
    if item is None:
        return "null"
    if isinstance(item, Decimal):
        return format_decimal(item)
    if isinstance(item, int):
        return str(item)
    raise TypeError(f"attribute values are flat: {type(item).__name__}")


def canonical_json(value: Mapping[str, Any]) -> str:
    """Compact, key-sorted JSON in which `Decimal`s are written as exact number literals."""
    return canonical_members([(key, canonical_value(value[key])) for key in sorted(value)])


def canonical_members(members: Sequence[tuple[str, str]]) -> str:
    """The canonical JSON object of (key, the value's canonical JSON) pairs in key order."""
    return (
        "{" + ",".join([f"{_json_string(key)}:{value_json}" for key, value_json in members]) + "}"
    )


def parse_attributes(text: str) -> dict[str, str | bool | Decimal]:
    parsed: dict[str, str | bool | Decimal] = json.loads(
        text, parse_float=Decimal, parse_int=Decimal
    )
    return parsed


class EventFields(Protocol):
    """What an application sends for an event, besides its id and attributes."""

    @property
    def tenant(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def quantity(self) -> Decimal: ...
    @property
    def time(self) -> datetime: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def unit(self) -> str | None: ...


def _clear_fields(event: EventFields) -> dict[str, Any]:
    return {
        "tenant": event.tenant,
        "type": event.type,
        "quantity": event.quantity,
        "time": format_time(event.time),
        "subject": event.subject,
        "unit": event.unit,
    }


def event_content(event: EventFields, attributes_json: str) -> bytes:
    """The canonical form of everything an application sent for one event identity: two
    reports are the same event exactly when these bytes match (`1.0` equals `1`, `+02:00`
    equals the same instant in `Z`, attribute order is ignored). It is digested with the
    tenant's key (crypto/sealing.py), never stored."""
    # canonical_json({**_clear_fields(event), "attributes": attributes_json}), written out
    # (keys in their sorted order): this runs for every event ingested.
    subject, unit = event.subject, event.unit
    return (
        '{"attributes":'
        + _json_string(attributes_json)
        + ',"quantity":'
        + canonical_value(event.quantity)
        + ',"subject":'
        + ("null" if subject is None else _json_string(subject))
        + ',"tenant":'
        + _json_string(event.tenant)
        + ',"time":"'
        + format_time(event.time)
        + '","type":'
        + _json_string(event.type)
        + ',"unit":'
        + ("null" if unit is None else _json_string(unit))
        + "}"
    ).encode()


def clear_content(event: EventFields) -> bytes:
    """`event_content` without the attributes: what can still be compared once a shred has
    destroyed the key that digested (and sealed) them."""
    return canonical_json(_clear_fields(event)).encode()


# Not frozen: a frozen dataclass sets each field through object.__setattr__, six times the
# cost of building one, and one is built per event ingested. Treated as immutable all the same.
@dataclass(slots=True)
class NewEvent:
    """A validated event, ready to be appended. `region` comes from the tenant.

    `attributes` are sealed with the tenant's data key; `digest` is the keyed digest of the
    event's content (`event_content`), which decides duplicate against conflict.
    """

    application: str
    id: str
    tenant: str
    type: str
    quantity: Decimal
    time: datetime
    subject: str | None
    unit: str | None
    attributes: bytes = field(repr=False)
    region: str
    digest: bytes = field(repr=False, compare=False)
    # The keyed tokens of the attributes (JSON: key token -> value token, docs/usage.md), and
    # the sealed dictionary entries (value token, sealed value) to store with the event: those
    # of its tokens that the ingest path does not know to be stored already.
    attribute_tokens: str | None = field(default=None, repr=False, compare=False)
    dictionary: tuple[tuple[str, bytes], ...] = field(default=(), repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.application, self.id)


@dataclass(slots=True)
class StoredEvent:
    """An event as exported: what was sent plus what Tally added.

    Not frozen: a store hands each caller fresh objects, and the export service opens their
    attributes in place (a copy per event cost a fifth of the export's time).
    """

    application: str
    id: str
    tenant: str
    type: str
    quantity: Decimal
    time: datetime
    subject: str | None
    unit: str | None
    sealed: bytes = field(repr=False)
    region: str
    received_at: datetime
    # Set once the attributes are opened (services/export.py); `shredded` when they never can
    # be, because the tenant's data key was destroyed.
    attributes_json: str | None = field(default=None, repr=False)
    shredded: bool = False
    # Set only where one event is shown (GET /v1/events/{application}/{id}): in the export
    # log a cancellation is an entry of its own, after the event.
    cancelled: Cancellation | None = None

    def fields(self) -> dict[str, Any]:
        """Every field of the export representation but the attributes (and `shredded`)."""
        head: dict[str, Any] = {
            "kind": "event",
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
        if self.cancelled is not None:
            head["cancelled"] = {
                "at": format_time(self.cancelled.received_at),
                "reason": self.cancelled.reason,
            }
        return head

    def to_json(self) -> str:
        """The export representation. Attributes are spliced in as opened: never re-parsed.

        A shredded tenant's event keeps its identity, time and quantity, with `attributes`
        null and `"shredded": true`, so a billing system sees why instead of an error.
        """
        if not self.shredded and self.attributes_json is None:
            raise ValueError("the attributes of this event were not opened")
        cancelled = self.cancelled
        return event_json(
            self.application,
            self.id,
            self.tenant,
            type=self.type,
            quantity=format_decimal(self.quantity),
            time=format_time(self.time),
            subject=self.subject,
            unit=self.unit,
            region=self.region,
            received_at=format_time(self.received_at),
            attributes_json=None if self.shredded else self.attributes_json,
            cancelled=(
                None
                if cancelled is None
                else (format_time(cancelled.received_at), cancelled.reason)
            ),
        )

    @property
    def attributes(self) -> dict[str, str | bool | Decimal] | None:
        return None if self.attributes_json is None else parse_attributes(self.attributes_json)


@dataclass(slots=True)
class Cancellation:
    """The cancellation of an event: an export-log entry of its own, appended once per event.

    `sealed_reason` is the reason sealed under the tenant's data key (crypto/sealing.py);
    `reason` is set once it is opened (services/cancel.py, services/export.py), and stays None
    with `shredded` when it never can be, because the tenant's data key was destroyed.
    """

    application: str
    id: str
    tenant: str
    sealed_reason: bytes = field(repr=False)
    received_at: datetime
    reason: str | None = field(default=None, repr=False)
    shredded: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.application, self.id)

    def to_dict(self) -> dict[str, Any]:
        """The export representation (the reason must be opened, or the tenant shredded)."""
        if self.reason is None and not self.shredded:
            raise ValueError("the reason of this cancellation was not opened")
        body: dict[str, Any] = {
            "kind": "cancellation",
            "application": self.application,
            "id": self.id,
            "tenant": self.tenant,
            "reason": self.reason,
            "received_at": format_time(self.received_at),
        }
        if self.shredded:
            body["shredded"] = True
        return body

    def to_json(self) -> str:
        if self.reason is None and not self.shredded:
            raise ValueError("the reason of this cancellation was not opened")
        return cancellation_json(
            self.application,
            self.id,
            self.tenant,
            None if self.shredded else self.reason,
            format_time(self.received_at),
        )


def _text_or_null(value: str | None) -> str:
    return "null" if value is None else _json_string(value)


def event_json(
    application: str,
    event_id: str,
    tenant: str,
    *,
    type: str,
    quantity: str,
    time: str,
    subject: str | None,
    unit: str | None,
    region: str,
    received_at: str,
    attributes_json: str | None,
    cancelled: tuple[str, str | None] | None = None,
    tail: str = "",
) -> str:
    """An event's export representation from its fields as the export writes them (the
    quantity `format_decimal`'s text, times `format_time`'s), `attributes_json` as opened
    (None: shredded), and where one event is shown the time and reason of its cancellation;
    `tail`, members written after the others (`,"cursor":"…"` in a stream).

    What `json.dumps` of the fields would write, compact and UTF-8 as is (its string
    encoder, in the same order), but written out: the export runs this for every entry.
    """
    more = ""
    if cancelled is not None:
        at, reason = cancelled
        more = f',"cancelled":{{"at":"{at}","reason":{_text_or_null(reason)}}}'
    if attributes_json is None:
        more += ',"attributes":null,"shredded":true'
    else:
        more += ',"attributes":' + attributes_json
    return (
        f'{{"kind":"event","id":{_json_string(event_id)},'
        f'"application":{_json_string(application)},"tenant":{_json_string(tenant)},'
        f'"type":{_json_string(type)},"quantity":"{quantity}","time":"{time}",'
        f'"subject":{"null" if subject is None else _json_string(subject)},'
        f'"unit":{"null" if unit is None else _json_string(unit)},'
        f'"region":{_json_string(region)},"received_at":"{received_at}"{more}{tail}}}'
    )


def cancellation_json(
    application: str,
    event_id: str,
    tenant: str,
    reason: str | None,
    received_at: str,
    *,
    tail: str = "",
) -> str:
    """A cancellation's export representation (`reason` None: its tenant was shredded), as
    `json.dumps` of `Cancellation.to_dict` would write it; `tail` as in `event_json`."""
    shredded = ',"shredded":true' if reason is None else ""
    return (
        f'{{"kind":"cancellation","application":{_json_string(application)},'
        f'"id":{_json_string(event_id)},"tenant":{_json_string(tenant)},'
        f'"reason":{_text_or_null(reason)},"received_at":"{received_at}"{shredded}{tail}}}'
    )
