"""The ingest path's fast forms say exactly what their reference forms say: the fast
acceptance of native events (validation._valid_event) accepts what the pydantic model accepts
and makes the same drafts (anything it does not accept goes to the model, whose errors are
then the answer), and the written-out content digest input and time format are byte for byte
the generic canonical ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tally.events.model import (
    _clear_fields,
    canonical_json,
    event_content,
    format_decimal,
    format_time,
)
from tally.events.validation import (
    EventDraft,
    EventIn,
    OutOfRangeNumber,
    _judge_quantity,
    _judge_time,
    _valid_event,
    parse_quantity,
    parse_rfc3339,
    validate_event,
)

TEXTS = st.one_of(
    st.sampled_from(
        ["a", "acme", "vm-1", "x" * 64, "x" * 65, "", " ", "A.b_c", "é", "\x00", "\ud800"]
    ),
    st.text(max_size=6),
)
VALUES = st.one_of(
    TEXTS,
    st.booleans(),
    st.none(),
    st.integers(),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.just(OutOfRangeNumber()),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from(["1", "1.5", "-1", "1e3", " 1", "0.0000000000000000001", "1" * 21]),
    st.sampled_from(
        [
            "2026-12-01T10:00:00Z",
            "2026-12-01T10:00:00.123456+02:00",
            "2026-12-01T10:00:00.1234567Z",
            "2026-13-01T10:00:00Z",
            "2026-12-01 10:00:00Z",
            "0001-01-01T00:00:00+01:00",
        ]
    ),
)
FIELDS = st.sampled_from(
    ["id", "tenant", "type", "quantity", "time", "subject", "unit", "attributes", "extra"]
)
VALID = {
    "id": "e-1",
    "tenant": "acme",
    "type": "compute.seconds",
    "quantity": Decimal("1.5"),
    "time": "2026-12-01T10:00:00Z",
}


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = dict(VALID)
    for name in draw(st.lists(FIELDS, max_size=4)):
        if draw(st.booleans()):
            event.pop(name, None)
        elif name == "attributes":
            event[name] = draw(st.dictionaries(TEXTS, VALUES, max_size=4))
        else:
            event[name] = draw(VALUES)
    return event


def _model(raw: dict[str, Any]) -> EventDraft | None:
    try:
        return EventIn.model_validate(raw).draft()
    except ValueError:
        return None


@settings(max_examples=3000, deadline=None)
@given(events())
def test_the_fast_path_accepts_exactly_what_the_model_accepts(raw: dict[str, Any]) -> None:
    fast = _valid_event(raw)
    model = _model(raw)
    assert fast == model
    if model is not None:
        assert validate_event(raw) == model


def test_a_plain_event_is_accepted_by_the_fast_path() -> None:
    raw = {**VALID, "subject": "vm-7", "unit": "s", "attributes": {"zone": "a", "n": Decimal(0)}}
    draft = _valid_event(raw)
    assert draft is not None and draft == _model(raw)
    assert draft.attributes == {"zone": "a", "n": Decimal(0)}
    assert _valid_event({**VALID, "quantity": True}) is None
    assert isinstance(validate_event({**VALID, "quantity": True}), list)


DRAFTS = st.builds(
    EventDraft,
    id=st.just("e-1"),
    tenant=st.sampled_from(["acme", "a.b-c"]),
    type=st.sampled_from(["compute.seconds", "x"]),
    quantity=st.decimals(min_value=0, max_value=10**20, places=6, allow_nan=False),
    time=st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    subject=st.one_of(st.none(), st.text(max_size=8)),
    unit=st.one_of(st.none(), st.text(max_size=8)),
    attributes=st.just({}),
)


@settings(max_examples=500, deadline=None)
@given(DRAFTS, st.text(max_size=20))
def test_the_written_out_content_is_the_canonical_json_of_the_fields(
    draft: EventDraft, attributes_json: str
) -> None:
    """event_content is written out for speed; it must stay byte for byte what the generic
    canonical form gives, or every stored digest would stop matching its retries."""
    reference = canonical_json({**_clear_fields(draft), "attributes": attributes_json}).encode()
    assert event_content(draft, attributes_json) == reference


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))])))
def test_format_time_is_the_instant_in_utc_with_microseconds(value: datetime) -> None:
    try:
        expected = value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
    except OverflowError:
        return
    assert format_time(value) == expected + "Z"
    assert format_time(value) == expected + "Z"  # from the minutes it keeps, too


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_format_decimal_is_the_plain_notation_without_trailing_zeros(value: Decimal) -> None:
    expected = format(value, "f")
    if "." in expected:
        expected = expected.rstrip("0").rstrip(".")
    assert format_decimal(value) == (expected or "0")
    assert "E" not in format_decimal(value)


def _outcome(parse: Any, value: object) -> tuple[str, object]:
    """What `parse` makes of `value`: its result's exact form, or the kind of its refusal."""
    try:
        found = parse(value)
    except ValueError as error:  # PydanticCustomError is one
        return "refused", getattr(error, "type", type(error).__name__)
    if isinstance(found, Decimal):
        return "decimal", found.as_tuple()  # the exponent too: 1.50 is not 1.5
    return "time", (found, found.utcoffset(), found.tzinfo)


DIGITS = st.text("0123456789", min_size=1, max_size=22)
QUANTITY_TEXTS = st.one_of(
    st.builds(lambda i, f: f"{i}.{f}" if f else i, DIGITS, st.one_of(st.just(""), DIGITS)),
    st.builds(lambda i: f"-{i}", DIGITS),
    st.sampled_from(["0", "0.0", "-0", "00", "0.000000000000000000", "1." + "0" * 19, ""]),
    st.sampled_from(["\u0661", "1\n", "1.", ".5", "1e3", "+1", "\u0661" * 4]),
)


@settings(max_examples=2000, deadline=None)
@given(QUANTITY_TEXTS)
def test_the_fast_quantity_is_what_every_check_makes_of_it(value: str) -> None:
    assert _outcome(parse_quantity, value) == _outcome(_judge_quantity, value)


def _two(n: int) -> st.SearchStrategy[str]:
    return st.integers(0, 10**n - 1).map(lambda v: str(v).zfill(n))


TIME_TEXTS = st.builds(
    lambda y, mo, d, h, mi, s, fraction, offset: f"{y}-{mo}-{d}T{h}:{mi}:{s}{fraction}{offset}",
    _two(4),
    _two(2),
    _two(2),
    _two(2),
    _two(2),
    _two(2),
    st.one_of(st.just(""), st.text("0123456789", min_size=0, max_size=8).map(lambda f: "." + f)),
    st.sampled_from(["Z", "z", "+00:00", "+05:30", "-23:59", ""]),
)


@settings(max_examples=2000, deadline=None)
@given(TIME_TEXTS)
def test_the_fast_time_is_what_every_check_makes_of_it(value: str) -> None:
    assert _outcome(parse_rfc3339, value) == _outcome(_judge_time, value)


def test_the_fast_forms_take_the_common_texts() -> None:
    assert parse_quantity("12.50").as_tuple() == Decimal("12.50").as_tuple()
    assert parse_quantity("0.00").as_tuple() == Decimal(0).as_tuple()
    assert parse_rfc3339("2026-12-01T10:00:00.5Z") == datetime(2026, 12, 1, 10, 0, 0, 500000, UTC)
    assert parse_rfc3339("2026-12-01T10:00:00Z").tzinfo is UTC
