"""Validation of reported events, native and CloudEvents, into `EventDraft`s or field errors.

The rules are DESIGN.md's event table. Bodies are parsed with `parse_json`, which turns every
JSON number into a `Decimal` (never a float) and refuses NaN and infinities, so a quantity is
exact from the first byte it is read. Each problem is reported with a JSON pointer relative to
the event; callers prefix it with the event's place in the request (`/events/17`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

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

_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
_TYPE_RE = re.compile(r"[a-z][a-z0-9_.:-]{0,127}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TEXT_RE = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
_DECIMAL_TEXT_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_RFC3339_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def _matches(pattern: re.Pattern[str], kind: str, message: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise _fail(kind, message)
        return value

    return AfterValidator(check)


def parse_quantity(value: object) -> Decimal:
    """A finite, non-negative decimal within NUMERIC(38,18). Refused, never rounded."""
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


def _check_attributes(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) > MAX_ATTRIBUTES:
        raise _fail("attributes_count", f"has more than {MAX_ATTRIBUTES} keys")
    return value


def _check_attribute_key(value: str) -> str:
    if not 1 <= len(value) <= MAX_ATTRIBUTE_KEY:
        raise _fail("attribute_key", f"attribute names are 1 to {MAX_ATTRIBUTE_KEY} characters")
    return value


def _check_attribute_value(value: object) -> str | bool | Decimal:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if len(value) > MAX_ATTRIBUTE_STRING:
            raise _fail(
                "attribute_length",
                f"string attributes are at most {MAX_ATTRIBUTE_STRING} characters",
            )
        return value
    if isinstance(value, (int, Decimal)) and Decimal(value).is_finite():
        number = Decimal(value)
        if number.is_zero():
            return Decimal(0)
        # Bounded so that its exact text stays short (1E+999999999 would be a billion digits).
        if len(number.as_tuple().digits) > MAX_ATTRIBUTE_DIGITS or abs(number.adjusted()) > 40:
            raise _fail(
                "attribute_number",
                f"numeric attributes have at most {MAX_ATTRIBUTE_DIGITS} digits, "
                "between 1e-40 and 1e40",
            )
        return number
    raise _fail("attribute_type", "attribute values are strings, finite numbers or booleans")


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
    _matches(_TEXT_RE, "text", "must be 1 to 256 characters without control characters"),
    WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": 256, "pattern": f"^{_TEXT_RE.pattern}$"}
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
AttributeValue = Annotated[
    str | bool | Decimal,
    BeforeValidator(_check_attribute_value),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "string", "maxLength": MAX_ATTRIBUTE_STRING},
                {"type": "number"},
                {"type": "boolean"},
            ]
        }
    ),
]
Attributes = Annotated[
    dict[Annotated[str, AfterValidator(_check_attribute_key)], AttributeValue],
    AfterValidator(_check_attributes),
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": MAX_ATTRIBUTES,
            "propertyNames": {"minLength": 1, "maxLength": MAX_ATTRIBUTE_KEY},
            "additionalProperties": {
                "oneOf": [
                    {"type": "string", "maxLength": MAX_ATTRIBUTE_STRING},
                    {"type": "number"},
                    {"type": "boolean"},
                ]
            },
        }
    ),
]

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
    datacontenttype: Literal["application/json"] | None = None
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


@dataclass(frozen=True, slots=True)
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
    return str(token).replace("~", "~0").replace("/", "~1")


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
    return _validate(EventIn, raw, "an event")


def validate_cloudevent(raw: object) -> EventDraft | list[FieldError]:
    """A structured-mode CloudEvent, or the problems with it (pointers relative to it)."""
    return _validate(CloudEventIn, raw, "a CloudEvent")


def _refuse_constant(name: str) -> None:
    raise InvalidInput(f"The body is not valid JSON: {name} is not a JSON number.")


def parse_json(body: bytes) -> Any:
    """Parse a request body; every number becomes a `Decimal`. Raises InvalidInput."""
    try:
        return json.loads(
            body, parse_float=Decimal, parse_int=Decimal, parse_constant=_refuse_constant
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        # The position helps the caller; the message never echoes the body.
        where = (
            f" at line {error.lineno}, column {error.colno}"
            if isinstance(error, json.JSONDecodeError)
            else ""
        )
        raise InvalidInput(f"The body is not valid UTF-8 JSON{where}.") from None
    except RecursionError:
        raise InvalidInput("The body is not valid JSON: it is nested too deeply.") from None
