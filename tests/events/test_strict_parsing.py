"""Strict reading of bodies and the one text rule (events/validation.py).

A body is UTF-8 and nothing else, names each member once, and a value no field can hold (a
number beyond any Decimal, a lone surrogate, a control character) is refused by the field that
holds it, so that it costs only its own event.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

import jsonschema_rs
import pytest

from tally.errors import InvalidInput
from tally.events.validation import (
    EventDraft,
    EventIn,
    parse_json,
    parse_model,
    validate_cloudevent,
    validate_event,
)
from tally.registry.models import ApplicationIn, KeyIn, RotateIn, TenantIn

HUGE = b"1e99999999999999999999999"  # beyond decimal's exponent range
EVENT = b'{"id":"e-1","tenant":"acme","type":"t","quantity":1,"time":"2026-11-25T12:00:00Z"'
CONTROLS = ["\x00", "\x1b", "\x1f", "\x7f", "\x80", "\x85", "\x9f"]


def with_member(member: bytes) -> bytes:
    """EVENT with one more member, written as raw JSON text."""
    return EVENT + b"," + member + b"}"


def errors_of(body: bytes) -> dict[str, str]:
    result = validate_event(parse_json(body))
    assert isinstance(result, list), result
    return {e.pointer: e.detail for e in result}


def refused(body: bytes) -> InvalidInput:
    with pytest.raises(InvalidInput) as raised:
        parse_json(body)
    return raised.value


# --- numbers no Decimal can hold ------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "pointer"),
    [
        (b'"colour":' + HUGE, "/colour"),
        (b'"attributes":{"n":' + HUGE + b"}", "/attributes/n"),
        (b'"attributes":{"n":-' + HUGE + b"}", "/attributes/n"),
        (b'"attributes":{"n":1e-99999999999999999999999}', "/attributes/n"),
        (b'"subject":' + HUGE, "/subject"),
    ],
)
def test_a_number_beyond_any_decimal_is_refused_by_its_field(member: bytes, pointer: str) -> None:
    assert pointer in errors_of(with_member(member))


def test_a_quantity_beyond_any_decimal_is_refused_at_quantity() -> None:
    body = EVENT.replace(b'"quantity":1', b'"quantity":' + HUGE) + b"}"

    assert set(errors_of(body)) == {"/quantity"}


def test_a_number_beyond_any_decimal_in_a_cloudevent_is_refused_in_data() -> None:
    cloudevent = (
        b'{"specversion":"1.0","id":"c","source":"/s","type":"t","time":"2026-11-25T12:00:00Z",'
        b'"data":{"tenant":"acme","quantity":' + HUGE + b',"attributes":{"n":' + HUGE + b"}}}"
    )
    result = validate_cloudevent(parse_json(cloudevent))

    assert isinstance(result, list), result
    assert {e.pointer for e in result} == {"/data/quantity", "/data/attributes/n"}


# --- lone surrogates and control characters: the one text rule ------------------------------


@pytest.mark.parametrize(
    ("member", "pointer"),
    [
        (b'"subject":"a\\ud800"', "/subject"),
        (b'"unit":"\\udfff"', "/unit"),
        (b'"attributes":{"sku":"\\ud83d"}', "/attributes/sku"),
        # A name that cannot be written in UTF-8 is pointed at with U+FFFD in its place.
        # (pydantic puts one per byte of the surrogate in the location it reports)
        (b'"attributes":{"\\udc00":"v"}', "/attributes/\ufffd"),
    ],
)
def test_a_lone_surrogate_escape_is_refused_by_its_field(member: bytes, pointer: str) -> None:
    problems = errors_of(with_member(member))

    assert any(where.startswith(pointer) for where in problems), problems
    for where in problems:
        where.encode()  # every pointer can be written in a UTF-8 answer


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("field", ["subject", "unit", "attribute name", "attribute value"])
def test_c0_del_and_c1_controls_are_refused_in_every_stored_text(field: str, control: str) -> None:
    text = f"a{control}b"
    raw: dict[str, Any] = {
        "id": "e-1",
        "tenant": "acme",
        "type": "t",
        "quantity": "1",
        "time": "2026-11-25T12:00:00Z",
    }
    pointer = {"attribute name": f"/attributes/{text}", "attribute value": "/attributes/k"}.get(
        field, f"/{field}"
    )
    if field == "attribute name":
        raw["attributes"] = {text: "v"}
    elif field == "attribute value":
        raw["attributes"] = {"k": text}
    else:
        raw[field] = text

    result = validate_event(raw)

    assert isinstance(result, list), result
    assert [e.pointer for e in result] == [pointer]
    assert "control characters" in result[0].detail


@pytest.mark.parametrize("model", [TenantIn, ApplicationIn])
@pytest.mark.parametrize("name", ["Acme\x85", "Acme\x00", "Acme\x1b[2J", "Acme\ud800"])
def test_tenant_and_application_names_follow_the_text_rule(
    model: type[TenantIn] | type[ApplicationIn], name: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse_model(model, json.dumps({"id": "t1", "name": name}).encode())

    assert [e.pointer for e in raised.value.errors] == ["/name"]


def _text_schemas() -> list[dict[str, Any]]:
    """The JSON Schema of every text of an event: subject, unit, attribute names and values."""
    event = EventIn.model_json_schema()["properties"]
    attributes = event["attributes"]
    string_value = next(
        s for s in attributes["additionalProperties"]["oneOf"] if s["type"] == "string"
    )
    return [
        event["subject"]["anyOf"][0],
        event["unit"]["anyOf"][0],
        {"type": "string", **attributes["propertyNames"]},
        string_value,
    ]


def test_the_json_schema_of_text_refuses_what_the_server_refuses() -> None:
    # jsonschema_rs reads patterns as ECMA-262 does, as client generators and schemathesis do.
    validators = [jsonschema_rs.validator_for(schema) for schema in _text_schemas()]
    # Every character up to U+20FF (C0, DEL, C1, Latin-1, U+2028...), a BOM, an emoji.
    for code in [*range(0x2100), 0xFEFF, 0x1F600]:
        if 0xD800 <= code <= 0xDFFF:
            continue  # no UTF-8 document holds one; the docs state the rule in words
        text = f"a{chr(code)}"
        kept = isinstance(
            validate_event(
                {
                    "id": "e-1",
                    "tenant": "acme",
                    "type": "t",
                    "quantity": "1",
                    "time": "2026-11-25T12:00:00Z",
                    "subject": text,
                    "attributes": {text: text},
                }
            ),
            EventDraft,
        )
        for validator in validators:
            assert validator.is_valid(text) == kept, hex(code)


# --- the body: UTF-8 only, each member once -------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        codecs.BOM_UTF8 + b"{}",
        codecs.BOM_UTF8 + EVENT + b"}",
        (EVENT + b"}").decode().encode("utf-16-le"),
        (EVENT + b"}").decode().encode("utf-16-be"),
        (EVENT + b"}").decode().encode("utf-16"),  # with its BOM
        (EVENT + b"}").decode().encode("utf-32-le"),
        (EVENT + b"}").decode().encode("utf-32"),
        with_member(b'"subject":"\xed\xa0\x80"'),  # U+D800 encoded (CESU-8), not escaped
        with_member(b'"subject":"\xc0\xaf"'),  # an overlong '/'
        with_member(b'"subject":"\xff"'),
    ],
)
def test_a_body_that_is_not_strictly_utf8_is_refused_whole(body: bytes) -> None:
    problem = refused(body)

    assert "UTF-8" in problem.detail
    assert [e.pointer for e in problem.errors] == [""]


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        (b'{"id":"a","id":"b"}', ""),
        (b'{"events":[{"id":"a"},{"id":"b","quantity":1,"quantity":2}]}', "/events/1"),
        (b'{"events":[{"attributes":{"zone":"a","zone":"b"}}]}', "/events/0/attributes"),
        (b'[{"data":{"a/b":{"x":1,"x":1}}}]', "/0/data/a~1b"),
    ],
)
def test_a_member_named_twice_refuses_the_body_at_its_object(body: bytes, pointer: str) -> None:
    problem = refused(body)

    assert [e.pointer for e in problem.errors] == [pointer]
    assert "twice" in problem.detail


def test_refusals_of_the_body_never_echo_it() -> None:
    secret = "s3cr3t-value"
    for body in [
        f'{{"{secret}":1,"{secret}":2}}'.encode(),
        codecs.BOM_UTF8 + f'{{"{secret}":1}}'.encode(),
        f'{{"{secret}":"\xed\xa0\x80"}}'.encode("latin-1"),
    ]:
        problem = refused(body)
        assert secret not in problem.detail
        assert all(secret not in e.pointer + e.detail for e in problem.errors)


# --- admin bodies: parse_model --------------------------------------------------------------


def test_parse_model_reads_admin_bodies_as_fastapi_does() -> None:
    tenant = parse_model(TenantIn, b'{"id":"t1","name":"T","lateness_hours":24}')
    key = parse_model(
        KeyIn,
        b'{"scopes":["events:write"],"application":"vm","tenants":["t1"],'
        b'"expires_at":"2030-01-01T00:00:00Z"}',
    )
    rotate = parse_model(RotateIn, b'{"grace_seconds":3600}')

    assert (tenant.id, tenant.name, tenant.lateness_hours) == ("t1", "T", 24)
    assert key == KeyIn.model_validate_json(
        '{"scopes":["events:write"],"application":"vm","tenants":["t1"],'
        '"expires_at":"2030-01-01T00:00:00Z"}'
    )
    assert rotate.grace_seconds == 3600
    with pytest.raises(InvalidInput) as raised:
        parse_model(RotateIn, b'{"grace_seconds":3600.0}')  # strict integers stay strict
    assert [e.pointer for e in raised.value.errors] == ["/grace_seconds"]


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        (b'{"id":"t1","lateness_hours":' + HUGE + b"}", "/lateness_hours"),
        (b'{"id":"t1","lateness_hours":' + b"9" * 5000 + b"}", "/lateness_hours"),
        (b'{"id":"t1","id":"t2"}', ""),
        (codecs.BOM_UTF8 + b'{"id":"t1"}', ""),
        (b'{"id":"t1","colour":"red"}', "/colour"),
    ],
)
def test_parse_model_refuses_with_pointers(body: bytes, pointer: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse_model(TenantIn, body)

    assert pointer in [e.pointer for e in raised.value.errors]
