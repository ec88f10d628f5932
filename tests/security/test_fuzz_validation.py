"""Event validation fuzzed with hypothesis: arbitrary bytes and arbitrary JSON never crash it,
problems point at the field that is wrong, and no message repeats a value it was sent.

(tests/events/test_validation.py covers the rules one by one and flat objects of simple
values; these go further: any bytes, any nesting, CloudEvents, and one field at a time.)
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tally.errors import FieldError, InvalidInput
from tally.events.validation import EventDraft, parse_json, validate_cloudevent, validate_event

MARK = "SECRET-MARK-7f3a"  # in every generated string: no message may repeat it

VALID = {
    "id": "evt-1",
    "tenant": "acme",
    "type": "compute.vcpu_seconds",
    "quantity": "1.5",
    "time": "2026-11-25T12:00:00Z",
    "subject": "vm-1",
    "unit": "s",
    "attributes": {"zone": "eu-1a", "n": Decimal(3), "on": True},
}
FIELDS = sorted(VALID)

marked_text = st.text(max_size=20).map(lambda text: f"{text}{MARK}")
scalars = (
    st.none()
    | st.booleans()
    | st.integers().map(Decimal)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | marked_text
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10) | marked_text, inner, max_size=5)
    ),
    max_leaves=25,
)
FUZZ = settings(max_examples=150, deadline=None)


def problems_of(result: EventDraft | list[FieldError]) -> list[FieldError]:
    assert isinstance(result, (EventDraft, list)), result
    return result if isinstance(result, list) else []


def assert_no_echo(problems: list[FieldError]) -> None:
    for problem in problems:
        assert MARK not in problem.detail, problem
        assert problem.pointer == "" or problem.pointer.startswith("/"), problem


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=50))
def test_any_bytes_parse_or_are_refused_without_echo(head: bytes, tail: bytes) -> None:
    body = head + MARK.encode() + tail
    try:
        parse_json(body)
    except InvalidInput as refused:
        assert MARK not in refused.detail
        assert_no_echo(refused.errors)


@FUZZ
@given(json_values)
def test_any_json_value_validates_or_is_refused_field_by_field(value: Any) -> None:
    for check in (validate_event, validate_cloudevent):
        assert_no_echo(problems_of(check(value)))


@FUZZ
@given(json_values)
def test_json_from_the_wire_validates_like_json_in_memory(value: Any) -> None:
    body = json.dumps(value, default=str).encode()
    assert_no_echo(problems_of(validate_event(parse_json(body))))


@FUZZ
@given(st.sampled_from(FIELDS), json_values)
def test_one_bad_field_is_the_only_one_blamed(field: str, value: Any) -> None:
    result = validate_event({**VALID, field: value})

    for problem in problems_of(result):
        assert problem.pointer == f"/{field}" or problem.pointer.startswith(f"/{field}/"), problem
    assert_no_echo(problems_of(result))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=70) | marked_text, scalars, max_size=34))
def test_attributes_are_kept_or_refused_without_echo(attributes: dict[str, Any]) -> None:
    result = validate_event({**VALID, "attributes": attributes})

    if isinstance(result, EventDraft):
        assert set(result.attributes) == set(attributes)
    for problem in problems_of(result):
        assert problem.pointer.startswith("/attributes"), problem
    assert_no_echo(problems_of(result))
