"""Event validation fuzzed with hypothesis: arbitrary bytes and arbitrary JSON never crash it,
problems point at the field that is wrong, and no message repeats a value it was sent.

(tests/events/test_validation.py covers the rules one by one and flat objects of simple
values; these go further: any bytes, any nesting, CloudEvents, and one field at a time.) The
last ones generate what once made a batch a 500 or was read leniently (huge exponents, lone
surrogates as escapes and as CESU-8 bytes, C0 and C1 controls, members named twice, byte
order marks, UTF-16/32) and post them to the API: never a 5xx, a batch's valid events are
stored, a faulty one is rejected with pointers into it, an unreadable body is a 400.
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.errors import FieldError, InvalidInput
from tally.events.validation import EventDraft, parse_json, validate_cloudevent, validate_event
from tests.api.helpers import auth, post_events
from tests.conftest import World, event

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


# --- values no field can hold, and bodies that are not strictly UTF-8 JSON ------------------
#
# Each generated case puts one nasty value (or member name) somewhere in an event, as raw JSON
# text. Some are the event's fault and must reject only that event, at a pointer into it;
# others make the body as a whole unreadable or ambiguous and must refuse it with a 400.

CONTROLS = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]

huge_numbers = st.builds(
    lambda sign, digits, exp_sign, exponent: f"{sign}{digits}e{exp_sign}{exponent}",
    st.sampled_from(["", "-"]),
    st.integers(1, 10**6).map(str),
    st.sampled_from(["", "+", "-"]),
    st.integers(10**19, 10**40).map(str),  # beyond decimal's exponent range
)
lone_surrogates = st.integers(0xD800, 0xDFFF).map(lambda code: f"\\u{code:04x}")
escaped_controls = st.sampled_from(CONTROLS).map(lambda c: json.dumps(c)[1:-1])  # "\u0085"
raw_c1 = st.sampled_from(CONTROLS[33:])  # C1 controls written as UTF-8, valid JSON text


def _string(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A JSON string literal holding `inner` between printable text."""
    text = st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E).filter(lambda c: c not in '"\\'),
        max_size=5,
    )
    return st.builds(lambda a, b, c: f'"{a}{MARK}{b}{c}"', text, inner, text)


# JSON text that no field of an event can hold: refused with the event's pointer.
event_faults = huge_numbers | _string(lone_surrogates | escaped_controls | raw_c1)
# Names of members no event may have (an unknown field, an attribute name): also the event's.
fault_names = _string(lone_surrogates | escaped_controls | raw_c1)
VALUE_PLACES = ["id", "tenant", "type", "quantity", "time", "subject", "unit", "attribute", "x"]


@st.composite
def faulty_events(draw: st.DrawFn) -> tuple[str, str]:
    """(an event as JSON text with one fault, the pointer prefix that must be blamed)."""
    fields: dict[str, Any] = {
        "id": "evt-1",
        "tenant": "acme",
        "type": "compute.vcpu_seconds",
        "quantity": "1",
        "time": "2026-11-25T12:00:00Z",
        "subject": "vm-1",
        "unit": "s",
        "attributes": {"zone": "eu-1a"},
    }
    if draw(st.booleans()):
        place = draw(st.sampled_from(VALUE_PLACES))
        fault = draw(event_faults)
        if place == "attribute":
            fields["attributes"]["sku"] = "@fault"
            blamed = "/attributes/sku"
        else:
            fields[place] = "@fault"
            blamed = f"/{place}"
        text = json.dumps(fields).replace('"@fault"', fault)
    else:
        name = draw(fault_names)
        into_attributes = draw(st.booleans())
        if into_attributes:
            fields["attributes"]["@name"] = "v"
        else:
            fields["@name"] = "v"
        text = json.dumps(fields).replace('"@name"', name)
        # pydantic cannot read a top-level name holding a surrogate: it blames the event.
        blamed = "/attributes/" if into_attributes else ""
    return text, blamed


@st.composite
def unreadable_bodies(draw: st.DrawFn, valid: bytes) -> bytes:
    """A batch holding `valid` that is, as a whole, not strictly UTF-8 JSON or ambiguous."""
    cesu8 = "\ud800".encode("utf-8", "surrogatepass")[:1] + draw(
        st.sampled_from([b"\xa0\x80", b"\xbf\xbf", b"\xb0\x81"])
    )  # a surrogate encoded as bytes: ED A0 80 and friends
    kind = draw(
        st.sampled_from(["cesu8", "duplicate", "nested_duplicate", "bom", "raw_c0", "utf16"])
    )
    batch = b'{"events": [' + valid + b", "
    if kind == "cesu8":
        return batch + b'{"id": "x", "subject": "' + cesu8 + b'"}]}'
    if kind == "duplicate":
        return batch + b'{"id": "x", "id": "y"}]}'
    if kind == "nested_duplicate":
        return batch + b'{"id": "x", "attributes": {"k": 1, "k": 1}}]}'
    if kind == "bom":
        return b"\xef\xbb\xbf" + batch + b"{}]}"
    if kind == "raw_c0":  # a C0 control written as itself inside a string is not JSON
        control = draw(st.sampled_from(CONTROLS[:32])).encode()
        return batch + b'{"subject": "a' + control + b'"}]}'
    return (
        (batch + b"{}]}").decode().encode(draw(st.sampled_from(["utf-16", "utf-16-be", "utf-32"])))
    )


@FUZZ
@given(faulty_events())
def test_a_fault_in_one_event_is_blamed_on_it_and_parsing_never_raises(
    case: tuple[str, str],
) -> None:
    text, blamed = case
    problems = problems_of(validate_event(parse_json(text.encode())))

    assert problems, text
    assert any(p.pointer.startswith(blamed) for p in problems), (text, problems)
    assert_no_echo(problems)
    for problem in problems:
        problem.pointer.encode()  # every pointer can be written in a UTF-8 answer


_VALID = json.dumps({**VALID, "attributes": {"zone": "eu-1a"}}).encode()


@FUZZ
@given(unreadable_bodies(_VALID))
def test_a_body_that_is_not_strictly_utf8_json_is_refused_whole(body: bytes) -> None:
    try:
        parse_json(body)
    except InvalidInput as refused:
        assert MARK not in refused.detail
        assert_no_echo(refused.errors)
    else:
        raise AssertionError(f"accepted {body!r}")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_batches_never_5xx_and_never_cost_their_valid_events(
    client: TestClient, world: World, data: st.DataObject
) -> None:
    tag = uuid.uuid4().hex[:12]  # the app and its store live across examples
    good = [json.dumps(event(f"ok-{tag}-{i}", subject="vm-\U0001f600")) for i in range(2)]
    reader = auth(world.reader)
    if data.draw(st.booleans(), label="one faulty event"):
        text, blamed = data.draw(faulty_events())
        body = f'{{"events": [{good[0]}, {text}, {good[1]}]}}'.encode()
        response = post_events(client, world.writer, body)

        assert response.status_code == 200, response.text
        outcomes = response.json()["events"]
        assert [o["status"] for o in outcomes] == ["accepted", "rejected", "accepted"]
        found = [e["pointer"] for e in outcomes[1]["errors"]]
        assert found, outcomes[1]
        assert all(p.startswith("/events/1") for p in found), found
        assert any(p.startswith(f"/events/1{blamed}") for p in found), found
        assert MARK not in json.dumps([e["detail"] for e in outcomes[1]["errors"]])
        for i in range(2):
            assert client.get(f"/v1/events/vm/ok-{tag}-{i}", headers=reader).status_code == 200
    else:
        body = data.draw(unreadable_bodies(good[0].encode()))
        response = post_events(client, world.writer, body)

        assert response.status_code == 400, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert client.get(f"/v1/events/vm/ok-{tag}-0", headers=reader).status_code == 404
