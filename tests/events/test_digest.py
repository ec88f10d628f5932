"""The reconciliation digest (events/digest.py) and its specification (docs/reconciliation.md)."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.errors import InvalidInput
from tally.events.digest import (
    DigestAccumulator,
    canonical_decimal,
    canonical_event,
    canonical_time,
    event_hash,
    reconciliation_digest,
    stored_event_hash,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "reconciliation.md"


def _block(name: str) -> str:
    """The fenced block of docs/reconciliation.md whose info string ends with `name`."""
    found = re.search(rf"^```\w+ {name}\n(.*?)^```$", DOC.read_text("utf-8"), re.M | re.S)
    assert found is not None, name
    return found.group(1).strip()


def _entry(number: int = 1, **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kind": "event",
        "id": f"evt-{number}",
        "application": "meter-api",
        "tenant": "acme",
        "type": "compute.seconds",
        "quantity": "12.5",
        "time": "2026-03-01T10:15:00.000000Z",
        "subject": "vm-1",
        "unit": "s",
        "region": "eu",
        "received_at": "2026-03-01T10:15:00.431207Z",
        "attributes": {"sku": "std", "cores": Decimal(4)},
    }
    entry.update(changes)
    return entry


def _cancellation(number: int) -> dict[str, Any]:
    return {
        "kind": "cancellation",
        "application": "meter-api",
        "id": f"evt-{number}",
        "tenant": "acme",
        "reason": "reported in error",
        "received_at": "2026-03-02T09:30:00.000000Z",
    }


PERIOD = [_entry(1), _entry(2, quantity="3", subject=None), _entry(3), _cancellation(3)]


def test_the_worked_example_of_the_specification_is_what_the_code_computes() -> None:
    entries = json.loads(_block("example-entries"), parse_float=Decimal)
    events = [e for e in entries if e["kind"] == "event"]
    cancelled = {e["id"] for e in entries if e["kind"] == "cancellation"}
    lines = _block("example-canonical").splitlines()
    hashes = _block("example-hashes").splitlines()
    assert len(events) == len(lines) == len(hashes) == 3
    total = 0
    for event, line, hex_hash in zip(events, lines, hashes, strict=True):
        assert canonical_event(event, event["id"] in cancelled) == line
        assert hashlib.sha256(line.encode()).hexdigest() == hex_hash
        assert event_hash(event, event["id"] in cancelled).hex() == hex_hash
        expansion = b"".join(
            hashlib.sha256(bytes.fromhex(hex_hash) + bytes([i])).digest() for i in range(16)
        )
        total = (total + int.from_bytes(expansion, "big")) % (1 << 4096)
    expansion_head = hashlib.sha256(bytes.fromhex(hashes[0]) + b"\x00").hexdigest()
    assert _block("example-expansion") == expansion_head
    assert total.to_bytes(512, "big").hex() == "".join(_block("example-sum").split())
    digest = "sha256-adhash4096:" + hashlib.sha256(total.to_bytes(512, "big")).hexdigest()
    assert _block("example-digest") == digest == reconciliation_digest(entries)
    # What the prose after the example claims.
    assert reconciliation_digest(reversed(entries)) == digest
    changed = {**events[0], "quantity": "12.50", "time": "2026-03-01T11:15:00+01:00"}
    changed["attributes"] = dict(reversed(list(changed["attributes"].items())))
    assert event_hash(changed, False).hex() == hashes[0]
    uncancelled = [e for e in entries if e["kind"] == "event"]
    assert reconciliation_digest(uncancelled) != digest


def test_an_empty_period_has_the_documented_digest() -> None:
    expected = "sha256-adhash4096:" + hashlib.sha256(bytes(512)).hexdigest()
    assert reconciliation_digest([]) == DigestAccumulator().hexdigest() == expected
    assert _block("example-empty") == expected


@settings(max_examples=50, deadline=None)
@given(st.permutations(PERIOD))
def test_the_digest_does_not_depend_on_the_order_of_entries(order: list[dict[str, Any]]) -> None:
    assert reconciliation_digest(order) == reconciliation_digest(PERIOD)


def test_accumulators_of_disjoint_events_merge_into_the_digest_of_their_union() -> None:
    whole, first, second = DigestAccumulator(), DigestAccumulator(), DigestAccumulator()
    for number in range(1, 5):
        whole.add(_entry(number), cancelled=number == 3)
        (first if number % 2 else second).add(_entry(number), cancelled=number == 3)
    first.merge(second)
    assert first.hexdigest() == whole.hexdigest()
    assert first.count == whole.count == 4


# One altered value per covered field: each must change the digest of the period.
ALTERATIONS: list[tuple[str, object]] = [
    ("application", "meter-api-2"),
    ("id", "evt-1b"),
    ("tenant", "acme-2"),
    ("type", "compute.minutes"),
    ("quantity", "12.51"),
    ("quantity", "0"),
    ("time", "2026-03-01T10:15:00.000001Z"),
    ("subject", "vm-9"),
    ("subject", None),
    ("unit", "ms"),
    ("unit", None),
    ("attributes", {"sku": "std", "cores": Decimal(5)}),
    ("attributes", {"sku": "std", "cores": "4"}),
    ("attributes", {"sku": "std"}),
    ("attributes", {"sku": "std", "cores": Decimal(4), "gpu": False}),
    ("attributes", {"sku": "std ", "cores": Decimal(4)}),
    ("shredded", True),
]


@pytest.mark.parametrize(("field", "value"), ALTERATIONS)
def test_altering_any_one_field_of_one_event_changes_the_digest(field: str, value: object) -> None:
    altered = [{**PERIOD[0], field: value}, *PERIOD[1:]]
    assert reconciliation_digest(altered) != reconciliation_digest(PERIOD)


def test_adding_removing_duplicating_or_cancelling_one_event_changes_the_digest() -> None:
    digest = reconciliation_digest(PERIOD)
    assert reconciliation_digest([*PERIOD, _entry(4)]) != digest
    assert reconciliation_digest(PERIOD[1:]) != digest
    assert reconciliation_digest([*PERIOD, PERIOD[0]]) != digest
    assert reconciliation_digest([*PERIOD, _cancellation(1)]) != digest
    # Removing the cancellation (not the event) changes it too.
    assert reconciliation_digest(PERIOD[:3]) != digest


def test_a_cancellation_naming_no_event_of_the_period_is_ignored() -> None:
    assert reconciliation_digest([*PERIOD, _cancellation(99)]) == reconciliation_digest(PERIOD)


def test_an_event_that_shows_its_own_cancellation_hashes_as_cancelled() -> None:
    shown = {**_entry(3), "cancelled": {"at": "2026-03-02T09:30:00Z", "reason": "error"}}
    assert reconciliation_digest([_entry(1), _entry(2, quantity="3", subject=None), shown]) == (
        reconciliation_digest(PERIOD)
    )


def test_fields_that_say_where_and_when_tally_stored_an_event_are_not_covered() -> None:
    moved = [
        {**entry, "region": "us", "received_at": "2027-01-01T00:00:00Z", "cursor": "c"}
        for entry in PERIOD
    ]
    bare = [{k: v for k, v in entry.items() if k != "kind"} for entry in PERIOD[:3]]
    assert reconciliation_digest(moved) == reconciliation_digest(PERIOD)
    # Entries without `kind` (today's export) are events.
    assert reconciliation_digest([*bare, _cancellation(3)]) == reconciliation_digest(PERIOD)


@pytest.mark.parametrize("quantity", ["1", "1.0", "1.000", Decimal("1.000"), 1, "1E+0", 1.0])
def test_equal_quantities_hash_alike(quantity: object) -> None:
    assert event_hash(_entry(quantity=quantity), False) == event_hash(_entry(quantity="1"), False)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("1.50E+2"), "150"),
        ("0.0100", "0.01"),
        (Decimal("1E-7"), "0.0000001"),
        ("-2.50", "-2.5"),
        ("-0", "0"),
        ("0.000", "0"),
        (Decimal("0E+5"), "0"),
        ("007.10", "7.1"),
        ("12345678901234567890.123456789012345678", "12345678901234567890.123456789012345678"),
    ],
)
def test_canonical_decimals_are_plain_and_exact(value: object, text: str) -> None:
    assert canonical_decimal(value) == text


def test_the_same_instant_in_any_offset_hashes_alike() -> None:
    utc = event_hash(_entry(time="2026-03-01T10:15:00Z"), False)
    assert event_hash(_entry(time="2026-03-01T12:15:00+02:00"), False) == utc
    assert event_hash(_entry(time="2026-03-01T10:15:00.000000000z"), False) == utc
    aware = datetime(2026, 3, 1, 12, 15, tzinfo=timezone(timedelta(hours=2)))
    assert event_hash(_entry(time=aware), False) == utc
    assert canonical_time(datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == (
        "0999-01-02T03:04:05.000006Z"
    )


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(
            st.booleans(),
            st.text(max_size=8),
            st.decimals(allow_nan=False, allow_infinity=False, places=3),
        ),
        max_size=6,
    ),
    st.randoms(),
)
def test_attribute_order_is_irrelevant(attributes: dict[str, Any], random: Any) -> None:
    items = list(attributes.items())
    random.shuffle(items)
    assert event_hash(_entry(attributes=dict(items)), False) == event_hash(
        _entry(attributes=attributes), False
    )


def test_non_ascii_is_written_as_itself_and_only_quotes_and_backslashes_are_escaped() -> None:
    text = canonical_event(_entry(subject='Zürich "vm" \\ 😀', attributes={}), False)
    assert '"subject":"Zürich \\"vm\\" \\\\ 😀"' in text


def test_a_shredded_event_hashes_with_null_attributes_whatever_the_entry_holds() -> None:
    exported = _entry(attributes=None, shredded=True)
    kept = _entry(attributes={"sku": "std"}, shredded=True)
    assert event_hash(exported, False) == event_hash(kept, False)
    assert '"attributes":null' in canonical_event(exported, False)
    assert '"shredded":true' in canonical_event(exported, False)


def test_the_server_form_with_native_values_hashes_as_the_exported_entry() -> None:
    native = _entry(
        quantity=Decimal("12.50"),
        time=datetime(2026, 3, 1, 10, 15, tzinfo=UTC),
        attributes={"cores": Decimal("4.0"), "sku": "std"},
    )
    assert event_hash(native, True) == event_hash(
        json.loads(json.dumps(_entry(attributes={"sku": "std", "cores": 4}))), True
    )


@pytest.mark.parametrize(
    ("entry", "pointer"),
    [
        ({**_entry(), "quantity": "1,5"}, "/quantity"),
        ({**_entry(), "quantity": "NaN"}, "/quantity"),
        ({**_entry(), "quantity": True}, "/quantity"),
        ({**_entry(), "time": "2026-03-01 10:15"}, "/time"),
        ({**_entry(), "time": "2026-03-01T10:15:00.0000001Z"}, "/time"),
        ({**_entry(), "time": datetime(2026, 3, 1)}, "/time"),
        ({**_entry(), "attributes": {"a": None}}, "/attributes/a"),
        ({**_entry(), "attributes": None}, "/attributes"),
        ({k: v for k, v in _entry().items() if k != "tenant"}, "/tenant"),
        ({**_entry(), "subject": "\ud800"}, "/subject"),
        ({**_entry(), "kind": "end"}, "/kind"),
        ({**_entry(), "attributes": {1: "a", "b": "c"}}, "/attributes"),
        (["not", "an", "object"], ""),
    ],
)
def test_a_malformed_entry_is_refused_naming_the_field(entry: Any, pointer: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        reconciliation_digest([entry])
    assert [e.pointer for e in raised.value.errors] == [pointer]


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=20))
def test_strings_are_written_as_json_dumps_without_ascii_escapes_writes_them(text: str) -> None:
    written = json.dumps(text, ensure_ascii=False)
    assert f'"subject":{written},' in canonical_event(_entry(subject=text), False)
    attributes = canonical_event(_entry(attributes={text: text}), False)
    assert f'"attributes":{{{written}:{written}}}' in attributes


_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_VALUES = st.one_of(
    _TEXT,
    st.booleans(),
    st.decimals(allow_nan=False, allow_infinity=False, places=6),
)


@settings(max_examples=300, deadline=None)
@given(
    strings=st.tuples(_TEXT, _TEXT, _TEXT, _TEXT),
    quantity=st.decimals(min_value=0, allow_nan=False, allow_infinity=False),
    time=st.datetimes(timezones=st.just(UTC)),
    subject=st.none() | _TEXT,
    unit=st.none() | _TEXT,
    attributes=st.none() | st.dictionaries(_TEXT, _VALUES, max_size=5),
    cancelled=st.booleans(),
)
def test_a_stored_events_hash_is_the_hash_of_its_entry(
    *,
    strings: tuple[str, str, str, str],
    quantity: Decimal,
    time: datetime,
    subject: str | None,
    unit: str | None,
    attributes: dict[str, Any] | None,
    cancelled: bool,
) -> None:
    """The server's hash of an event from its typed fields (services/reconciliation.py) is
    the one a billing system computes from the entry it was exported as."""
    application, event_id, tenant, type_ = strings
    entry = {
        "application": application,
        "id": event_id,
        "tenant": tenant,
        "type": type_,
        "quantity": quantity,
        "time": time,
        "subject": subject,
        "unit": unit,
        "attributes": attributes,
        "shredded": attributes is None,
    }
    assert stored_event_hash(
        application=application,
        event_id=event_id,
        tenant=tenant,
        type=type_,
        quantity=quantity,
        time=time,
        subject=subject,
        unit=unit,
        attributes=attributes,
        cancelled=cancelled,
    ) == event_hash(entry, cancelled)
