"""The reconciliation digest of one (tenant, type, period): docs/reconciliation.md.

One definition for the server (`/v1/reconciliation`) and for the client SDK, which recomputes
it from exported entries. So this module imports nothing of Tally's but its errors: a billing
system's copy of the SDK runs it with no store and no keys.

Each event is reduced to the canonical JSON of what a billing system receives for it (identity,
tenant, type, quantity, time, subject, unit, attributes) plus whether it is shredded and whether
it is cancelled, and hashed with SHA-256. A period's digest combines those hashes by addition,
so that it depends on the multiset of events and not on their order, and can be accumulated one
event at a time in constant memory. The sum is taken over 4096-bit expansions of the hashes, not
over the 256-bit hashes themselves: a sum of 256-bit values can be forged with a generalised
birthday search (Wagner 2002) in about 2^32 work, whereas 4096 bits put that out of reach.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from json.encoder import encode_basestring
from typing import Any

from tally.errors import FieldError, InvalidInput

DIGEST_PREFIX = "sha256-adhash4096:"
_BLOCKS = 16  # SHA-256 blocks of 32 bytes: 16 x 256 = 4096 bits
_MODULUS = 1 << (256 * _BLOCKS)
_SUM_BYTES = 32 * _BLOCKS
_SUFFIXES = tuple(bytes([i]) for i in range(_BLOCKS))

_DECIMAL_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_RFC3339_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)
# Fields of an event entry that the digest does not cover: where and when Tally stored it
# differs between a copy and its restore elsewhere, and says nothing about what is billed.
NOT_COVERED = frozenset({"kind", "region", "received_at", "cursor"})


def _invalid(pointer: str, detail: str) -> InvalidInput:
    # Messages name the field, never its value (errors.py).
    return InvalidInput(
        f"An entry's {pointer[1:] or 'value'} {detail}.", [FieldError(pointer, detail)]
    )


def canonical_decimal(value: object, pointer: str = "/quantity") -> str:
    """The canonical text of a finite decimal: no exponent, no sign but a leading `-` for a
    negative number, no leading zeros (`0.5`), no trailing zeros after the point and no point
    without digits after it (`1.500` -> `1.5`, `1.0` -> `1`, `1.5E+2` -> `150`), `0` for any zero.

    Takes a `Decimal`, an `int`, a `float` (through its shortest round-trip text: exact only
    for values a float holds, so parse exports with `parse_float=Decimal`) or a string in JSON
    number syntax (leading zeros allowed). Raises InvalidInput for anything else or a
    non-finite value.
    """
    if isinstance(value, bool):
        raise _invalid(pointer, "must be a decimal number")
    if isinstance(value, float):
        value = repr(value)
        if not _DECIMAL_RE.fullmatch(value):
            raise _invalid(pointer, "must be finite")
    if isinstance(value, str):
        if not _DECIMAL_RE.fullmatch(value):
            raise _invalid(pointer, "must be a decimal number such as 12.5")
        try:
            value = Decimal(value)
        except InvalidOperation:
            raise _invalid(pointer, "is out of range") from None
    if isinstance(value, int):
        value = Decimal(value)
    if not isinstance(value, Decimal):
        raise _invalid(pointer, "must be a decimal number")
    if not value.is_finite():
        raise _invalid(pointer, "must be finite")
    return _plain_decimal(value)


def canonical_time(value: object, pointer: str = "/time") -> str:
    """The canonical text of an instant: RFC 3339 in UTC with exactly six fraction digits and
    `Z`, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (`2026-03-01T10:00:00+02:00` ->
    `2026-03-01T08:00:00.000000Z`).

    Takes an aware `datetime` or an RFC 3339 string with an offset; fraction digits beyond the
    sixth must be zeros (Tally keeps microseconds). Raises InvalidInput otherwise.
    """
    if isinstance(value, str):
        match = _RFC3339_RE.fullmatch(value)
        if match is None:
            raise _invalid(pointer, "must be RFC 3339 with an offset")
        date, clock, fraction, offset = match.groups()
        if fraction and len(fraction.rstrip("0")) > 6:
            raise _invalid(pointer, "has more than microsecond precision")
        micro = (fraction or "").ljust(6, "0")[:6]
        zone = "+00:00" if offset in "Zz" else offset
        try:
            value = datetime.fromisoformat(f"{date}T{clock}.{micro}{zone}")
            value = value.astimezone(UTC)
        except (ValueError, OverflowError):
            raise _invalid(pointer, "is not a valid date and time") from None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise _invalid(pointer, "must be an RFC 3339 time with an offset")
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        raise _invalid(pointer, "is not a valid date and time") from None
    # isoformat pads the year to four digits, which strftime does not on every platform.
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _string(value: object, pointer: str) -> str:
    if not isinstance(value, str):
        raise _invalid(pointer, "must be a string")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate is no Unicode text: it has no UTF-8 bytes to hash.
            raise _invalid(pointer, "holds a lone surrogate") from None
    # What json.dumps(value, ensure_ascii=False) writes: non-ASCII as itself, only `"`, `\`
    # and U+0000-U+001F escaped.
    return encode_basestring(value)


def _optional_string(value: object, pointer: str) -> str:
    return "null" if value is None else _string(value, pointer)


def canonical_attributes(value: object, pointer: str = "/attributes") -> str:
    """The canonical JSON of an attributes object: members sorted by the Unicode code points of
    their names, no whitespace, strings as `_string` writes them, booleans `true`/`false`,
    numbers as bare `canonical_decimal` literals. Raises InvalidInput for another value type
    (attributes are flat: no null, array or object values)."""
    if not isinstance(value, Mapping):
        raise _invalid(pointer, "must be an object")
    if not all(isinstance(name, str) for name in value):
        raise _invalid(pointer, "must have string names")
    parts: list[str] = []
    # The common cases written out (ASCII text, a finite Decimal): the server hashes every
    # event of a period, and the member's pointer is only needed for an error.
    for name in sorted(value):
        item = value[name]
        if item is True or item is False:
            encoded = "true" if item else "false"
        elif type(item) is str and item.isascii():
            encoded = encode_basestring(item)
        elif type(item) is Decimal and item.is_finite():
            encoded = _plain_decimal(item)
        elif isinstance(item, str):
            encoded = _string(item, _member(pointer, name))
        elif isinstance(item, (int, float, Decimal)):
            encoded = canonical_decimal(item, _member(pointer, name))
        else:
            raise _invalid(_member(pointer, name), "must be a string, a number or a boolean")
        key = encode_basestring(name) if name.isascii() else _string(name, pointer)
        parts.append(f"{key}:{encoded}")
    return "{" + ",".join(parts) + "}"


def _member(pointer: str, name: str) -> str:
    """The JSON pointer of member `name` of the object at `pointer`."""
    return f"{pointer}/{name.replace('~', '~0').replace('/', '~1')}"


def _plain_decimal(value: Decimal) -> str:
    """`canonical_decimal` of a finite Decimal."""
    if value.is_zero():
        return "0"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _is_cancelled(entry: Mapping[str, Any]) -> bool:
    # GET /v1/events/{application}/{id} shows `"cancelled": {"at", "reason"}`; an export entry
    # may carry `true`. Absent, null or false: not cancelled.
    return bool(entry.get("cancelled"))


def canonical_event(entry: Mapping[str, Any], cancelled: bool | None = None) -> str:
    """The canonical JSON that `event_hash` hashes: the object

        {"application", "attributes", "cancelled", "id", "quantity", "shredded",
         "subject", "tenant", "time", "type", "unit"}

    in that (sorted) order, without whitespace. `quantity` is a JSON string holding
    `canonical_decimal`, `time` a string holding `canonical_time`, `subject` and `unit` a string
    or null (null when absent), `attributes` `canonical_attributes` (`{}` when absent) or null
    for a shredded event (`"shredded": true` in the entry: its attributes are destroyed and
    ignored), `cancelled` and `shredded` booleans.

    `cancelled` defaults to the entry's own `cancelled` member being present and truthy. Other
    members (`kind`, `region`, `received_at`, `cursor`, ...) are ignored. Raises InvalidInput
    when a covered field is missing or malformed.
    """
    for name in ("application", "id", "tenant", "type", "quantity", "time"):
        if name not in entry:
            raise _invalid(f"/{name}", "is required")
    shredded = entry.get("shredded", False)
    if not isinstance(shredded, bool):
        raise _invalid("/shredded", "must be a boolean")
    attributes = "null" if shredded else canonical_attributes(entry.get("attributes", {}))
    if cancelled is None:
        cancelled = _is_cancelled(entry)
    members = (
        ("application", _string(entry["application"], "/application")),
        ("attributes", attributes),
        ("cancelled", "true" if cancelled else "false"),
        ("id", _string(entry["id"], "/id")),
        ("quantity", f'"{canonical_decimal(entry["quantity"])}"'),
        ("shredded", "true" if shredded else "false"),
        ("subject", _optional_string(entry.get("subject"), "/subject")),
        ("tenant", _string(entry["tenant"], "/tenant")),
        ("time", f'"{canonical_time(entry["time"])}"'),
        ("type", _string(entry["type"], "/type")),
        ("unit", _optional_string(entry.get("unit"), "/unit")),
    )
    return "{" + ",".join(f'"{name}":{value}' for name, value in members) + "}"


def stored_event_hash(
    *,
    application: str,
    event_id: str,
    tenant: str,
    type: str,
    quantity: Decimal,
    time: datetime,
    subject: str | None,
    unit: str | None,
    attributes: Mapping[str, Any] | None,
    cancelled: bool,
) -> bytes:
    """`event_hash` of an event whose fields are of the types a store's are (strings, a
    finite Decimal, an aware datetime, the attributes parsed, None when shredded): the same
    canonical JSON, written without an entry mapping or a check of each member, for the
    server, which hashes every event of a period (measured: 99 us per event through
    `canonical_event`, see tests/events/test_digest.py for the equality)."""
    text = (
        '{"application":'
        + encode_basestring(application)
        + ',"attributes":'
        + ("null" if attributes is None else canonical_attributes(attributes))
        + (',"cancelled":true,"id":' if cancelled else ',"cancelled":false,"id":')
        + encode_basestring(event_id)
        + ',"quantity":"'
        + canonical_decimal(quantity)
        + (
            '","shredded":true,"subject":'
            if attributes is None
            else '","shredded":false,"subject":'
        )
        + ("null" if subject is None else encode_basestring(subject))
        + ',"tenant":'
        + encode_basestring(tenant)
        + ',"time":"'
        + canonical_time(time)
        + '","type":'
        + encode_basestring(type)
        + ',"unit":'
        + ("null" if unit is None else encode_basestring(unit))
        + "}"
    )
    return hashlib.sha256(text.encode("utf-8")).digest()


def event_hash(entry: Mapping[str, Any], cancelled: bool | None = None) -> bytes:
    """SHA-256 of the UTF-8 bytes of `canonical_event(entry, cancelled)`: 32 bytes."""
    return hashlib.sha256(canonical_event(entry, cancelled).encode("utf-8")).digest()


def expand(hash_: bytes) -> int:
    """The 4096-bit integer that the digest adds for one event hash: the big-endian value of
    SHA-256(hash || 0x00) || SHA-256(hash || 0x01) || ... || SHA-256(hash || 0x0f)."""
    base = hashlib.sha256(hash_)
    blocks = []
    for suffix in _SUFFIXES:
        block = base.copy()
        block.update(suffix)
        blocks.append(block.digest())
    return int.from_bytes(b"".join(blocks), "big")


class DigestAccumulator:
    """A period's digest, one event at a time, in constant memory.

    The order of `add` calls does not matter, and accumulators of disjoint sets of events
    `merge` into the accumulator of their union (hours into a day, shards into a whole).
    """

    __slots__ = ("_count", "_sum")

    def __init__(self) -> None:
        self._sum = 0
        self._count = 0

    def add(self, event_fields: Mapping[str, Any], cancelled: bool) -> None:
        """Count one event. `event_fields` is an export entry or a mapping with the same
        names holding native values (`Decimal` quantity, aware `datetime` time, attributes as
        a mapping, `shredded`). Raises InvalidInput, counting nothing, when it is malformed."""
        self.add_hash(event_hash(event_fields, cancelled))

    def add_hash(self, hash_: bytes) -> None:
        """Count one event by its `event_hash`."""
        if len(hash_) != 32:
            raise ValueError("an event hash is 32 bytes")
        self._sum = (self._sum + expand(hash_)) & (_MODULUS - 1)
        self._count += 1

    def merge(self, other: DigestAccumulator) -> None:
        """Add every event counted by `other` (a disjoint set of events) to this one."""
        self._sum = (self._sum + other._sum) % _MODULUS
        self._count += other._count

    @property
    def count(self) -> int:
        """How many events were added, cancelled ones included."""
        return self._count

    def hexdigest(self) -> str:
        """`sha256-adhash4096:` and the lowercase hex SHA-256 of the sum as 512 big-endian
        bytes. An empty period has a digest too: that of 512 zero bytes."""
        total = self._sum.to_bytes(_SUM_BYTES, "big")
        return DIGEST_PREFIX + hashlib.sha256(total).hexdigest()


def _identity(entry: Mapping[str, Any]) -> tuple[str, str]:
    for name in ("application", "id"):
        if not isinstance(entry.get(name), str):
            raise _invalid(f"/{name}", "must be a string")
    return (entry["application"], entry["id"])


def reconciliation_digest(entries: Iterable[Mapping[str, Any]]) -> str:
    """The digest of one (tenant, type, period) from its export entries, in any order.

    Entries of `"kind": "event"` (or no `kind`, as exports before cancellations had) are the
    events; entries of `"kind": "cancellation"` mark the event with their `application` and
    `id` as cancelled. A cancellation that names no event among `entries` is ignored, so every
    cancellation of an export may be passed with one period's events: it cannot hide a
    difference, since the missing event itself changes the digest. An event given twice is
    counted twice, as the copy that holds it twice differs from Tally's.

    Raises InvalidInput for an entry of another kind or a malformed event.
    """
    events: list[Mapping[str, Any]] = []
    cancelled: set[tuple[str, str]] = set()
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise _invalid("", "must be an object")
        kind = entry.get("kind", "event")
        if kind == "event":
            events.append(entry)
        elif kind == "cancellation":
            cancelled.add(_identity(entry))
        else:
            raise _invalid("/kind", "must be event or cancellation")
    accumulator = DigestAccumulator()
    for event in events:
        accumulator.add(event, _is_cancelled(event) or _identity(event) in cancelled)
    return accumulator.hexdigest()
