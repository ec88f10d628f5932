"""Event validation: DESIGN.md's field rules, exact decimals, RFC 3339 times, pointers."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.errors import InvalidInput
from tally.events.model import canonical_json, format_decimal, parse_attributes
from tally.events.validation import (
    EventDraft,
    parse_json,
    parse_quantity,
    parse_rfc3339,
    validate_cloudevent,
    validate_event,
)

BASE = {
    "id": "evt-1",
    "tenant": "acme",
    "type": "compute.vcpu_seconds",
    "quantity": "1",
    "time": "2026-11-25T12:00:00Z",
}


def errors_of(raw: object) -> dict[str, str]:
    result = validate_event(raw)
    assert isinstance(result, list), result
    return {e.pointer: e.detail for e in result}


def test_json_numbers_become_decimals_never_floats() -> None:
    parsed = parse_json(b'{"a": 0.1, "b": 0.2, "c": 3}')

    assert parsed["a"] + parsed["b"] == Decimal("0.3")
    assert all(isinstance(v, Decimal) for v in parsed.values())


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_json_non_finite_literals_are_refused(literal: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_json(b'{"quantity": ' + literal + b"}")


def test_invalid_json_is_refused_without_echoing_it() -> None:
    with pytest.raises(InvalidInput) as raised:
        parse_json(b'{"secret-value": ')

    assert "secret-value" not in raised.value.detail


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", Decimal(0)),
        (Decimal("1.50"), Decimal("1.50")),
        (
            "99999999999999999999.999999999999999999",
            Decimal("99999999999999999999.999999999999999999"),
        ),
        ("0.000000000000000001", Decimal("1E-18")),
        ("1.0000000000000000000000", Decimal(1)),  # trailing zeros are not precision
        (Decimal("1E+3"), Decimal(1000)),
        ("-0", Decimal(0)),
        (Decimal("1E+3"), Decimal(1000)),
    ],
)
def test_quantities_accepted_exactly(value: object, expected: Decimal) -> None:
    assert parse_quantity(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "-1",
        "0.0000000000000000001",
        "100000000000000000000",
        "NaN",
        "Infinity",
        "1e400",
        "abc",
        "",
        " 1",
        "+1",
        "1_000",
        ".5",
        "1.",
        "1e5",
        True,
        1.5,
        None,
        [],
    ],
)
def test_quantities_refused(value: object) -> None:
    assert "/quantity" in errors_of({**BASE, "quantity": value})


@given(
    st.decimals(
        min_value=0,
        max_value=Decimal("99999999999999999999.999999999999999999"),
        places=18,
        allow_nan=False,
        allow_infinity=False,
    )
)
def test_any_numeric_38_18_quantity_survives_exactly(value: Decimal) -> None:
    draft = validate_event({**BASE, "quantity": format_decimal(value)})

    assert isinstance(draft, EventDraft)
    assert draft.quantity == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T12:00:00Z", datetime(2026, 11, 25, 12, tzinfo=UTC)),
        ("2026-11-25T14:00:00+02:00", datetime(2026, 11, 25, 12, tzinfo=UTC)),
        ("2026-11-25t12:00:00.123456z", datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2026-11-25T12:00:00.123456000Z", datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_rfc3339_times_with_offsets(text: str, expected: datetime) -> None:
    assert parse_rfc3339(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-25T12:00:00",  # naive
        "2026-11-25 12:00:00Z",
        "2026-11-25",
        "2026-13-25T12:00:00Z",
        "2026-11-25T12:00:00.1234567Z",  # finer than microseconds
        "1732536000",
    ],
)
def test_times_refused(text: str) -> None:
    assert "/time" in errors_of({**BASE, "time": text})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "has space"),
        ("id", "x" * 129),
        ("id", ""),
        ("id", "é"),
        ("id", 5),
        ("tenant", "-acme"),
        ("type", "Compute"),
        ("type", "9x"),
        ("subject", ""),
        ("unit", "x" * 257),
    ],
)
def test_field_rules(field: str, value: object) -> None:
    assert f"/{field}" in errors_of({**BASE, field: value})


def test_unknown_and_missing_fields_are_named() -> None:
    raw = {k: v for k, v in BASE.items() if k != "tenant"} | {"colour": "red"}

    assert errors_of(raw) == {"/tenant": "is required", "/colour": "is not a field of this object"}


@pytest.mark.parametrize(
    ("attributes", "pointer"),
    [
        ({f"k{i}": "v" for i in range(33)}, "/attributes"),
        ({"k" * 65: "v"}, "/attributes/" + "k" * 65),
        ({"sku": "x" * 257}, "/attributes/sku"),
        ({"nested": {"a": 1}}, "/attributes/nested"),
        ({"nothing": None}, "/attributes/nothing"),
        ({"list": [1]}, "/attributes/list"),
        ({"a/b": [1]}, "/attributes/a~1b"),
        ({"huge": Decimal("1E+999999999")}, "/attributes/huge"),
        ({"long": Decimal("1." + "1" * 40)}, "/attributes/long"),
        ({"tiny": Decimal("1E-41")}, "/attributes/tiny"),
    ],
)
def test_attribute_bounds(attributes: dict[str, object], pointer: str) -> None:
    assert pointer in errors_of({**BASE, "attributes": attributes})


def test_attribute_values_are_kept_exactly_and_canonically() -> None:
    draft = validate_event(
        parse_json(
            b'{"id":"a","tenant":"acme","type":"t","quantity":1,"time":"2026-11-25T12:00:00Z",'
            b'"attributes":{"z":0.10,"a":"x","flag":true,"n":12345678901234567890.5}}'
        )
    )

    assert isinstance(draft, EventDraft)
    text = canonical_json(draft.attributes)
    assert text == '{"a":"x","flag":true,"n":12345678901234567890.5,"z":0.1}'
    assert parse_attributes(text)["n"] == Decimal("12345678901234567890.5")


def test_cloudevent_maps_fields_and_data() -> None:
    draft = validate_cloudevent(
        {
            "specversion": "1.0",
            "id": "ce-1",
            "source": "/vm",
            "type": "compute.vcpu_seconds",
            "time": "2026-11-25T12:00:00Z",
            "subject": "vm-42",
            "traceparent": "00-abc",  # extension attributes are allowed and ignored
            "data": {"tenant": "acme", "quantity": "2.5", "unit": "s", "attributes": {"z": "a"}},
        }
    )

    assert draft == EventDraft(
        id="ce-1",
        tenant="acme",
        type="compute.vcpu_seconds",
        quantity=Decimal("2.5"),
        time=datetime(2026, 11, 25, 12, tzinfo=UTC),
        subject="vm-42",
        unit="s",
        attributes={"z": "a"},
    )


def test_cloudevent_problems_point_into_data() -> None:
    result = validate_cloudevent(
        {
            "specversion": "0.3",
            "id": "x",
            "type": "t",
            "time": "2026-11-25T12:00:00Z",
            "data": {"tenant": "acme", "quantity": "-1", "extra": 1},
        }
    )

    assert isinstance(result, list)
    assert {e.pointer for e in result} == {
        "/specversion",
        "/source",
        "/data/quantity",
        "/data/extra",
    }


@given(st.dictionaries(st.text(max_size=10), st.none() | st.integers() | st.text(max_size=5)))
def test_validation_never_raises_on_arbitrary_objects(raw: dict[str, object]) -> None:
    result = validate_event(raw)
    assert isinstance(result, (list, EventDraft))


def test_zero_attribute_numbers_of_any_exponent_are_zero() -> None:
    draft = validate_event({**BASE, "attributes": {"z": Decimal("0E-50")}})

    assert isinstance(draft, EventDraft)
    assert canonical_json(draft.attributes) == '{"z":0}'
