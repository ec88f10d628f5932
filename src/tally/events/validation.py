"""Validation of reported events, native and CloudEvents, into `EventDraft`s or field errors.

The rules are DESIGN.md's event table. Bodies are parsed with `parse_json`, which reads them
strictly (UTF-8 only, no name twice in an object) and turns every JSON number into a `Decimal`
(never a float), so a quantity is exact from the first byte it is read. Each problem is
reported with a JSON pointer relative to the event; callers prefix it with the event's place in
the request (`/events/17`).

What cannot be judged at the level of the body is left in place for the field that holds it to
refuse: a number no Decimal can hold becomes an `OutOfRangeNumber`, and a lone surrogate written
as an escape (`"\\ud800"`) stays in its string, where the one text rule (`check_text`) refuses
it. So one such value rejects only the event it is in, never its neighbours in a batch.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from tally.errors import FieldError, InvalidInput

MAX_INTEGER_DIGITS = 20
MAX_FRACTION_DIGITS = 18
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY = 64
MAX_ATTRIBUTE_STRING = 256
MAX_ATTRIBUTE_DIGITS = 40
MAX_TEXT = 256

_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
_TYPE_RE = re.compile(r"[a-z][a-z0-9_.:-]{0,127}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DECIMAL_TEXT_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
# Quantities and times as senders mostly write them, which the fast branches of
# `parse_quantity` and `parse_rfc3339` take without the general checks: anything these match
# passes them, with the same result.
_PLAIN_QUANTITY_RE = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,18})?")
_UTC_RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?Z"
)
_RFC3339_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)


# The one rule for text that Tally stores (subject, unit, attribute names and string values,
# tenant and application names): no C0 control, DEL or C1 control, which terminals, log viewers
# and CSV readers act on (U+0085 is a line break to some), and no lone surrogate, which is not
# Unicode at all: it cannot be encoded as UTF-8, so it could be neither sealed nor stored.
_REFUSED_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
TEXT_CHARACTERS = "no control characters (U+0000-U+001F, U+007F-U+009F) or lone surrogates"
# The same rule for JSON Schema. Lone surrogates are left out: a JSON document in UTF-8 cannot
# hold one but as an escape, and in an ECMA-262 pattern without the u flag a class of
# surrogates would also match the halves of every character beyond U+FFFF.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def is_encodable(value: str) -> bool:
    """Whether `value` can be written as UTF-8: it holds no lone surrogate."""
    return _SURROGATE.search(value) is None


def check_text(value: str, *, kind: str = "text", minimum: int = 1, maximum: int = MAX_TEXT) -> str:
    """`value` if it has `minimum` to `maximum` characters and passes the text rule; else a
    validation error of `kind` (the message names the rule, never the value)."""
    if not minimum <= len(value) <= maximum:
        raise _fail(kind, f"must be {minimum} to {maximum} characters")
    if _REFUSED_CHARACTER.search(value):
        raise _fail(kind, f"must hold {TEXT_CHARACTERS}")
    return value


@dataclass(frozen=True, slots=True)
class OutOfRangeNumber:
    """A JSON number that no Decimal can hold (`1e99999999999999999999999`).

    `parse_json` puts it where the number was, so that the field holding it refuses it (every
    typed field does) and only that event is rejected, rather than the body failing to parse.
    """


def _matches(pattern: re.Pattern[str], kind: str, message: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise _fail(kind, message)
        return value

    return AfterValidator(check)


def parse_quantity(value: object) -> Decimal:
    """A finite, non-negative decimal within NUMERIC(38,18). Refused, never rounded."""
    if type(value) is str and _PLAIN_QUANTITY_RE.fullmatch(value):
        # At most 20 digits before the point and 18 after, none negative: what the checks
        # of `_judge_quantity` would pass as they are.
        number = Decimal(value)
        return number if number else Decimal(0)
    return _judge_quantity(value)


def _judge_quantity(value: object) -> Decimal:
    """`parse_quantity` for any value, with every check."""
    if isinstance(value, OutOfRangeNumber):
        raise _fail(
            "quantity_range", "is out of range: at most 20 digits before the point, 18 after"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise _fail("quantity_type", "must be a decimal number, as a JSON number or string")
    if isinstance(value, str) and not _DECIMAL_TEXT_RE.fullmatch(value):
        # Decimal() would also take ' 1', '+1', '1_000', '.5' and '1e5': a string quantity is
        # plain digits with an optional fraction, nothing a reader could take for another value.
        raise _fail("quantity_syntax", "must be a plain decimal such as 12.5")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise _fail("quantity_syntax", "must be a plain decimal such as 12.5") from None
    if not number.is_finite():
        raise _fail("quantity_finite", "must be finite")
    if number.is_zero():
        return Decimal(0)
    if number.is_signed():
        raise _fail("quantity_negative", "must not be negative")
    # Digits are counted on the tuple: normalize() and abs() would round to the context's
    # 28 digits, and NUMERIC(38,18) holds 38.
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # noqa: S101 - finite numbers have integer exponents
    kept = len(digits)
    while exponent < 0 and digits[kept - 1] == 0:
        kept -= 1
        exponent += 1
    if -exponent > MAX_FRACTION_DIGITS:
        raise _fail("quantity_precision", "has more than 18 digits after the decimal point")
    if kept + exponent > MAX_INTEGER_DIGITS:
        raise _fail("quantity_range", "has more than 20 digits before the decimal point")
    return number


def parse_rfc3339(value: object) -> datetime:
    """RFC 3339 with an explicit offset (`Z` or `±hh:mm`), at most microsecond precision."""
    if type(value) is str and _UTC_RFC3339_RE.fullmatch(value):
        try:
            # In UTC to the microsecond already: read as it is (tzinfo UTC).
            return datetime.fromisoformat(value)
        except ValueError:
            pass  # a date or clock out of range: `_judge_time` says which rule
    return _judge_time(value)


def _judge_time(value: object) -> datetime:
    """`parse_rfc3339` for any value, with every check."""
    if not isinstance(value, str):
        raise _fail("time_type", "must be an RFC 3339 string")
    match = _RFC3339_RE.fullmatch(value)
    if match is None:
        raise _fail(
            "time_format",
            "must be RFC 3339 with an explicit offset, e.g. 2026-01-31T12:00:00Z",
        )
    date, clock, fraction, offset = match.groups()
    if fraction and len(fraction.rstrip("0")) > 6:
        raise _fail("time_precision", "has more than microsecond precision")
    micro = (fraction or "").ljust(6, "0")[:6]
    try:
        parsed = datetime.fromisoformat(
            f"{date}T{clock}.{micro}{'+00:00' if offset in 'Zz' else offset}"
        )
        # In UTC, 0001-01-01T00:00:00+01:00 falls before year 1: OverflowError, not ValueError.
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _fail("time_range", "is not a valid date and time") from None


def media_type_of(value: str) -> tuple[str, list[tuple[str, str]]]:
    """The `type/subtype` of a Content-Type (or `datacontenttype`) value, lower-case, and its
    parameters as (lower-case name, value without quotes) pairs."""
    kind, *parameters = value.split(";")
    pairs = []
    for parameter in parameters:
        name, _, text = parameter.partition("=")
        pairs.append((name.strip().lower(), text.strip().strip('"')))
    return kind.strip().lower(), pairs


def is_utf8_charset(parameters: list[tuple[str, str]]) -> bool:
    """Whether no `charset` parameter names another encoding than UTF-8, the only one a JSON
    text may be in (RFC 8259 section 8.1)."""
    return all(value.lower() == "utf-8" for name, value in parameters if name == "charset")


def _check_datacontenttype(value: str) -> str:
    # Parameters are allowed (`application/json; charset=utf-8`, as SDKs write it): the media
    # type is what says how `data` is read, and Tally reads it as JSON in UTF-8 only.
    kind, parameters = media_type_of(value)
    if kind != "application/json":
        raise _fail("datacontenttype", "must be application/json, with or without parameters")
    if not is_utf8_charset(parameters):
        raise _fail("datacontenttype", "must have no charset but utf-8")
    return value


def _check_attributes(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) > MAX_ATTRIBUTES:
        raise _fail("attributes_count", f"has more than {MAX_ATTRIBUTES} keys")
    return value


def _check_attribute_key(value: str) -> str:
    return check_text(value, kind="attribute_key", maximum=MAX_ATTRIBUTE_KEY)


def _check_attribute_value(value: object) -> str | bool | Decimal:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return check_text(value, kind="attribute_string", minimum=0, maximum=MAX_ATTRIBUTE_STRING)
    if isinstance(value, (int, Decimal)) and Decimal(value).is_finite():
        number = Decimal(value)
        if number.is_zero():
            return Decimal(0)
        # Bounded so that its exact text stays short (1E+999999999 would be a billion digits).
        if len(number.as_tuple().digits) <= MAX_ATTRIBUTE_DIGITS and abs(number.adjusted()) <= 40:
            return number
    elif not isinstance(value, OutOfRangeNumber):
        raise _fail("attribute_type", "attribute values are strings, finite numbers or booleans")
    raise _fail(
        "attribute_number",
        f"numeric attributes have at most {MAX_ATTRIBUTE_DIGITS} digits, between 1e-40 and 1e40",
    )


EventId = Annotated[
    str,
    _matches(_ID_RE, "id", "must be 1 to 128 printable ASCII characters without spaces"),
    WithJsonSchema({"type": "string", "pattern": f"^{_ID_RE.pattern}$"}),
]
EventType = Annotated[
    str,
    _matches(_TYPE_RE, "type", "must match ^[a-z][a-z0-9_.:-]{0,127}$"),
    WithJsonSchema({"type": "string", "pattern": f"^{_TYPE_RE.pattern}$"}),
]
Name = Annotated[
    str,
    _matches(_NAME_RE, "name", "must be 1 to 64 of A-Z a-z 0-9 _ . - and start alphanumeric"),
    WithJsonSchema({"type": "string", "pattern": f"^{_NAME_RE.pattern}$"}),
]
Text = Annotated[
    str,
    AfterValidator(check_text),
    WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": MAX_TEXT, "pattern": TEXT_PATTERN}
    ),
]
Quantity = Annotated[
    Decimal,
    BeforeValidator(parse_quantity),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "string", "pattern": r"^[0-9]{1,20}(\.[0-9]+)?$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "Exact decimal, >= 0, at most 20 digits before the point and 18 after.",
        }
    ),
]
Rfc3339 = Annotated[
    datetime,
    BeforeValidator(parse_rfc3339),
    WithJsonSchema(
        {"type": "string", "format": "date-time", "pattern": f"^{_RFC3339_RE.pattern}$"}
    ),
]
DataContentType = Annotated[
    str,
    AfterValidator(_check_datacontenttype),
    WithJsonSchema({"type": "string", "pattern": r"^application/json\s*(;.*)?$"}),
]
_ATTRIBUTE_VALUE_SCHEMA = {
    "oneOf": [
        {"type": "string", "maxLength": MAX_ATTRIBUTE_STRING, "pattern": TEXT_PATTERN},
        {"type": "number"},
        {"type": "boolean"},
    ]
}
AttributeValue = Annotated[
    str | bool | Decimal,
    BeforeValidator(_check_attribute_value),
    WithJsonSchema(_ATTRIBUTE_VALUE_SCHEMA),
]
Attributes = Annotated[
    dict[Annotated[str, AfterValidator(_check_attribute_key)], AttributeValue],
    AfterValidator(_check_attributes),
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": MAX_ATTRIBUTES,
            "propertyNames": {
                "minLength": 1,
                "maxLength": MAX_ATTRIBUTE_KEY,
                "pattern": TEXT_PATTERN,
            },
            "additionalProperties": _ATTRIBUTE_VALUE_SCHEMA,
        }
    ),
]

M = TypeVar("M", bound=BaseModel)

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class EventIn(BaseModel):
    """A billing event as a target application reports it."""

    model_config = _STRICT

    id: EventId
    tenant: Name
    type: EventType
    quantity: Quantity
    time: Rfc3339
    subject: Text | None = None
    unit: Text | None = None
    attributes: Attributes = Field(default_factory=dict)

    def draft(self) -> EventDraft:
        return EventDraft(
            id=self.id,
            tenant=self.tenant,
            type=self.type,
            quantity=self.quantity,
            time=self.time,
            subject=self.subject,
            unit=self.unit,
            attributes=self.attributes,
        )


class CloudEventData(BaseModel):
    """The `data` of a usage CloudEvent."""

    model_config = _STRICT

    tenant: Name
    quantity: Quantity
    unit: Text | None = None
    attributes: Attributes = Field(default_factory=dict)


class CloudEventIn(BaseModel):
    """A usage event in CloudEvents 1.0 structured mode. Extension attributes are ignored."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    specversion: Literal["1.0"]
    id: EventId
    source: Annotated[str, Field(min_length=1)]
    type: EventType
    time: Rfc3339
    subject: Text | None = None
    datacontenttype: DataContentType | None = None
    dataschema: str | None = None
    data: CloudEventData

    def draft(self) -> EventDraft:
        return EventDraft(
            id=self.id,
            tenant=self.data.tenant,
            type=self.type,
            quantity=self.data.quantity,
            time=self.time,
            subject=self.subject,
            unit=self.data.unit,
            attributes=self.data.attributes,
        )


# Not frozen: a frozen dataclass sets each field through object.__setattr__, six times the
# cost of building one, and one is built per event ingested. Treated as immutable all the same.
@dataclass(slots=True)
class EventDraft:
    """An event whose fields are valid on their own; tenant rules are checked by the service."""

    id: str
    tenant: str
    type: str
    quantity: Decimal
    time: datetime
    subject: str | None
    unit: str | None
    attributes: dict[str, str | bool | Decimal]


def _escape(token: object) -> str:
    # A name holding a lone surrogate cannot be written in a UTF-8 answer: U+FFFD stands in.
    text = _SURROGATE.sub("\ufffd", str(token))
    return text.replace("~", "~0").replace("/", "~1")


def pointer_of(loc: tuple[int | str, ...]) -> str:
    """Pydantic's error location as an RFC 6901 pointer; dict keys lose pydantic's '[key]'."""
    return "".join(f"/{_escape(part)}" for part in loc if part != "[key]")


def _errors_of(error: ValidationError) -> list[FieldError]:
    found: list[FieldError] = []
    for item in error.errors(include_url=False, include_input=False):
        detail = item["msg"]
        if item["type"] == "extra_forbidden":
            detail = "is not a field of this object"
        elif item["type"] == "missing":
            detail = "is required"
        found.append(FieldError(pointer=pointer_of(item["loc"]), detail=detail))
    return found


def _validate(
    model: type[EventIn] | type[CloudEventIn], raw: object, what: str
) -> EventDraft | list[FieldError]:
    if not isinstance(raw, dict):
        return [FieldError(pointer="", detail=f"{what} must be a JSON object")]
    try:
        return model.model_validate(raw).draft()
    except ValidationError as error:
        return _errors_of(error)


def validate_event(raw: object) -> EventDraft | list[FieldError]:
    """A native event object, or the problems with it (pointers relative to the event)."""
    if isinstance(raw, dict) and (draft := _valid_event(raw)) is not None:
        return draft
    return _validate(EventIn, raw, "an event")


_EVENT_FIELDS = frozenset(EventIn.model_fields)
_REQUIRED_EVENT_FIELDS = frozenset(
    name for name, field in EventIn.model_fields.items() if field.is_required()
)


def _valid_event(raw: dict[str, Any]) -> EventDraft | None:
    """The draft of a native event that `EventIn` accepts, found by calling its validators
    directly, with none of pydantic's machinery around them; None for anything that is not
    plainly valid, which `EventIn` then judges and explains. Both accept exactly the same
    events and make the same drafts (tests/events/test_fast_validation.py)."""
    if not raw.keys() <= _EVENT_FIELDS or not raw.keys() >= _REQUIRED_EVENT_FIELDS:
        return None
    event_id, tenant, kind = raw["id"], raw["tenant"], raw["type"]
    subject, unit = raw.get("subject"), raw.get("unit")
    attributes = raw.get("attributes", {})
    if not (
        type(event_id) is str
        and type(tenant) is str
        and type(kind) is str
        and (subject is None or type(subject) is str)
        and (unit is None or type(unit) is str)
        and type(attributes) is dict
        and len(attributes) <= MAX_ATTRIBUTES
        and _ID_RE.fullmatch(event_id)
        and _NAME_RE.fullmatch(tenant)
        and _TYPE_RE.fullmatch(kind)
    ):
        return None
    try:
        return EventDraft(
            id=event_id,
            tenant=tenant,
            type=kind,
            quantity=parse_quantity(raw["quantity"]),
            time=parse_rfc3339(raw["time"]),
            subject=None if subject is None else check_text(subject),
            unit=None if unit is None else check_text(unit),
            attributes=_plain_attributes(attributes),
        )
    except (PydanticCustomError, TypeError):  # TypeError: a key that is not a str
        return None


def _plain_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """`{_check_attribute_key(k): _check_attribute_value(v)}`, with the checks of a text key
    and a text value, the common case, written out here: this runs for every attribute of
    every event. What they do not pass goes to the checks themselves, which refuse it."""
    checked: dict[str, Any] = {}
    for sent, value in attributes.items():
        key = (
            sent
            if type(sent) is str
            and 1 <= len(sent) <= MAX_ATTRIBUTE_KEY
            and not _REFUSED_CHARACTER.search(sent)
            else _check_attribute_key(sent)
        )
        if (
            type(value) is str
            and len(value) <= MAX_ATTRIBUTE_STRING
            and not _REFUSED_CHARACTER.search(value)
        ):
            checked[key] = value
        else:
            checked[key] = _check_attribute_value(value)
    return checked


def validate_cloudevent(raw: object) -> EventDraft | list[FieldError]:
    """A structured-mode CloudEvent, or the problems with it (pointers relative to it)."""
    return _validate(CloudEventIn, raw, "a CloudEvent")


def _number(text: str) -> Decimal | OutOfRangeNumber:
    try:
        return Decimal(text)
    except InvalidOperation:
        # An exponent beyond what decimal holds (1e99999999999999999999999).
        return OutOfRangeNumber()


def _integer(text: str) -> int | OutOfRangeNumber:
    try:
        return int(text)
    except ValueError:
        # Over the interpreter's limit on digits converted to an int (4,300 by default).
        return OutOfRangeNumber()


def _text_of(body: bytes) -> str:
    if body.startswith(codecs.BOM_UTF8):
        raise InvalidInput(
            "The body starts with a byte order mark: send UTF-8 without one.",
            [FieldError("", "starts with a byte order mark")],
        )
    if json.detect_encoding(body) != "utf-8":
        raise InvalidInput(
            "The body is not UTF-8 (it reads as UTF-16 or UTF-32): send UTF-8.",
            [FieldError("", "is not UTF-8")],
        )
    try:
        # Strict, unlike json.loads(bytes), which decodes with 'surrogatepass' and so lets
        # encoded surrogates (CESU-8 bytes ED A0 80) through as text no UTF-8 store can hold.
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInput(
            f"The body is not valid UTF-8 (at byte {error.start}).",
            [FieldError("", "is not valid UTF-8")],
        ) from None


def _pointer_to(root: object, target: object) -> str:
    """The pointer of `target` (by identity) inside `root`; walked without recursion, since
    what json.loads could nest a walk can follow."""
    pending: list[tuple[str, object]] = [("", root)]
    while pending:
        pointer, value = pending.pop()
        if value is target:
            return pointer
        if isinstance(value, dict):
            pending.extend((f"{pointer}/{_escape(k)}", v) for k, v in value.items())
        elif isinstance(value, list):
            pending.extend((f"{pointer}/{i}", v) for i, v in enumerate(value))
    return ""


def parse_json(body: bytes, *, decimal_integers: bool = True) -> Any:
    """Parse a request body strictly; every number becomes a `Decimal` (or an
    `OutOfRangeNumber`, for the field that holds it to refuse); integers become `int`
    instead with `decimal_integers=False`.

    Raises InvalidInput, naming no value of the body, when the body is not UTF-8 (a byte
    order mark, UTF-16 or UTF-32, invalid or encoded-surrogate bytes), not JSON (NaN and
    Infinity are not JSON numbers), nested too deeply, or when an object names a member
    twice: a gateway that keeps the first and Tally the last would read two different
    bodies. Admin routes parse their bodies with it too (see `parse_model`).
    """
    text = _text_of(body)
    repeated: list[dict[str, Any]] = []
    constants: list[str] = []

    # The hooks never raise: what they find is refused below, once the whole body is read.
    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found = dict(pairs)
        if len(found) < len(pairs):
            repeated.append(found)
        return found

    def constant(name: str) -> None:
        constants.append(name)

    try:
        parsed = json.loads(
            text,
            parse_float=_number,
            parse_int=_number if decimal_integers else _integer,
            parse_constant=constant,
            object_pairs_hook=members,
        )
    except json.JSONDecodeError as error:
        # The position helps the caller; the message never echoes the body.
        raise InvalidInput(
            f"The body is not valid JSON at line {error.lineno}, column {error.colno}.",
            [FieldError("", "is not valid JSON")],
        ) from None
    except RecursionError:
        raise InvalidInput("The body is not valid JSON: it is nested too deeply.") from None
    if constants:
        raise InvalidInput(f"The body is not valid JSON: {constants[0]} is not a JSON number.")
    if repeated:
        raise InvalidInput(
            "The body names a member twice in one object.",
            [FieldError(_pointer_to(parsed, repeated[0]), "names a member more than once")],
        )
    return parsed


def parse_model(model: type[M], body: bytes) -> M:
    """`body` parsed strictly by `parse_json` and validated as `model` (an admin route's body).

    Integers are read as `int`, as FastAPI reads them, for the models' strict integer fields.
    Raises InvalidInput: as `parse_json` does, or with each field's problem at its pointer.
    """
    try:
        return model.model_validate(parse_json(body, decimal_integers=False))
    except ValidationError as error:
        raise InvalidInput("The request is invalid; see errors.", _errors_of(error)) from None
