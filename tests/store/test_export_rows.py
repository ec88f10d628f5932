"""The export's own read (`read_rows`): plain rows whose JSON is, byte for byte, what the
export wrote from objects before (json.dumps of the fields, formatted in Python)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from tally.crypto.records import DataKey
from tally.errors import InvalidInput
from tally.events.cursor import CursorCodec, Position
from tally.events.log import ROW_ID, ROW_SEALED, ROW_TENANT, ExportFilter, row_fields, row_json
from tally.events.model import Cancellation, format_decimal, format_time
from tally.registry.records import Tenant
from tally.store.dialect import SQLiteDialect
from tally.store.interface import EventStore
from tests.store.test_conformance import NOW, cipher, new_event

ODD = [
    ("plain", "1.50", NOW, None),
    ("zero", "0", datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC), 'quote " back \\ slash'),
    ("tiny", "0.000000000000000001", datetime(2026, 1, 1, tzinfo=UTC), "ünï 🎉 tab\tnl\n"),
    ("huge", "12345678901234567890.5", datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "x"),
    ("round", "150.000", NOW, "\x01\x1f"),
]


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _reference(event_id: str, quantity: str, time: datetime, subject: str | None) -> str:
    """What the export wrote for the event before it had rows (fields by json.dumps)."""
    attributes = '{"n":1}'
    head = _dumps(
        {
            "kind": "event",
            "id": event_id,
            "application": "vm",
            "tenant": "acme",
            "type": "compute.vcpu_seconds",
            "quantity": format_decimal(Decimal(quantity)),
            "time": format_time(time),
            "subject": subject,
            "unit": "s",
            "region": "eu-west",
            "received_at": format_time(NOW),
        }
    )
    return f'{head[:-1]},"attributes":{attributes}}}'


def _rows(store: EventStore, **filters: Any) -> list[tuple[Any, ...]]:
    page = store.read_rows(
        positions=[0] * store.partitions, start=0, filters=ExportFilter(**filters), limit=100
    )
    return page.events


def test_rows_write_what_json_dumps_of_the_fields_wrote(store: EventStore) -> None:
    events = [
        new_event(event_id, quantity=quantity, time=time, subject=subject, attributes={"n": 1})
        for event_id, quantity, time, subject in ODD
    ]
    store.append(events, received_at=NOW)
    opener = cipher("acme")

    written = {
        row[ROW_ID]: row_json(
            row, opener.open(application="vm", event_id=row[ROW_ID], sealed=row[ROW_SEALED])
        )
        for row in _rows(store)
    }

    assert written == {
        event_id: _reference(event_id, quantity, time, subject)
        for event_id, quantity, time, subject in ODD
    }
    # And the objects the store reads write the same text.
    page = store.read(positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=9)
    for event in page.events:
        assert not isinstance(event, Cancellation)
        event.attributes_json = '{"n":1}'
        assert event.to_json() == written[event.id]


def test_a_cancellation_row_and_a_shredded_tenant(store: EventStore) -> None:
    store.create_tenant(
        Tenant(id="acme", name=None, region="eu-west", lateness_hours=24, created_at=NOW)
    )
    store.add_data_key(
        DataKey(tenant="acme", master_key_id="m", wrapped=b"w", created_at=NOW, shredded_at=None)
    )
    store.append([new_event("a", attributes={"n": 1})], received_at=NOW)
    sealed = cipher("acme").seal_reason(application="vm", event_id="a", reason='said "twice"')
    store.cancel(Cancellation("vm", "a", "acme", sealed_reason=sealed, received_at=NOW))

    event, cancellation = _rows(store)
    assert row_json(cancellation, 'said "twice"') == _dumps(
        {
            "kind": "cancellation",
            "application": "vm",
            "id": "a",
            "tenant": "acme",
            "reason": 'said "twice"',
            "received_at": format_time(NOW),
        }
    )
    assert row_json(cancellation, None).endswith(
        ',"reason":null,"received_at":"2026-11-25T12:00:00.000000Z","shredded":true}'
    )
    assert row_json(event, None).endswith(',"attributes":null,"shredded":true}')
    assert row_fields(event, None)["shredded"] is True
    assert row_fields(cancellation, "r")["shredded"] is None
    assert len(_rows(store, kind="cancellation")) == 1

    page = store.read_rows(
        positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=9
    )
    assert page.shredded == set()
    store.shred_data_key("acme", at=NOW)
    page = store.read_rows(
        positions=[0] * store.partitions, start=0, filters=ExportFilter(), limit=9
    )
    assert page.shredded == {"acme"} and {row[ROW_TENANT] for row in page.events} == {"acme"}


def test_sqlite_quantities_not_written_by_format_decimal_are_made_so() -> None:
    connection = sqlite3.connect(":memory:")
    found = SQLiteDialect().plain_rows(
        connection,
        "SELECT value, 'e30=' FROM json_each(?)",
        [json.dumps(["1.50", "1E+2", "007", "0.0", "2", "0.25", None])],
        sealed=1,
        decimal=0,
    )
    assert [row[0] for row in found] == ["1.5", "100", "7", "0", "2", "0.25", None]
    assert found[0][1] == b"{}"  # the sealed column read as bytes (base64 text in SQLite)


def test_a_cursor_walk_gives_each_line_the_position_right_after_it() -> None:
    codec = CursorCodec(b"s" * 32)
    digest, epoch = b"d" * 12, b"e" * 16
    walk = codec.walk([5, 6, 7, 8], 2, digest, epoch)
    first = walk.current()
    lines = walk.lines([(2, 9), (2, 12), (3, 80), (0, 6), (1, 60), (1, 61)])

    def at(cursor: str) -> Position:
        return codec.decode(cursor, filter_digest=digest, partitions=4)

    assert at(first) == Position([5, 6, 7, 8], 2, epoch)
    assert [at(line) for line in lines] == [
        Position([5, 6, 9, 8], 2, epoch),
        Position([5, 6, 12, 8], 2, epoch),
        Position([5, 6, 12, 80], 3, epoch),
        Position([6, 6, 12, 80], 0, epoch),
        Position([6, 60, 12, 80], 1, epoch),
        Position([6, 61, 12, 80], 1, epoch),
    ]
    # The walk has moved on past them all.
    assert at(walk.current()) == Position([6, 61, 12, 80], 1, epoch)
    # The same place twice: two cursors that differ, of the same length as `encode`'s.
    assert walk.current() != walk.current()
    assert len(walk.current()) == len(codec.encode([5, 60, 7, 80], 3, digest, epoch))
    # Every line's cursor has one length, whatever its offsets.
    assert len({len(line) for line in lines}) == 1


def _line_cursors() -> tuple[CursorCodec, list[str]]:
    codec = CursorCodec(b"s" * 32)
    walk = codec.walk([0, 0, 0, 0], 0, b"d" * 12, b"e" * 16)
    return codec, walk.lines([(1, 3), (1, 4), (2, 7)]) + walk.lines([(1, 9)])


def test_a_line_cursor_altered_anywhere_is_refused() -> None:
    codec, lines = _line_cursors()
    line = lines[1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for at in range(len(line)):
        if line[at] == ".":
            continue
        swapped = alphabet[(alphabet.index(line[at]) + 1) % 64]
        altered = line[:at] + swapped + line[at + 1 :]
        with pytest.raises(InvalidInput):
            codec.decode(altered, filter_digest=b"d" * 12, partitions=4)
    for altered in (line + "A", line[:-1], line.replace(".", ""), line + ".AAAA", "." + line):
        with pytest.raises(InvalidInput):
            codec.decode(altered, filter_digest=b"d" * 12, partitions=4)


def test_a_line_block_moved_to_another_base_is_refused() -> None:
    codec, lines = _line_cursors()
    (base_a, block_a), (base_b, block_b) = lines[0].split("."), lines[2].split(".")
    base_c = lines[3].split(".")[0]  # the same partition as lines[0], another read
    for base, block in ((base_a, block_b), (base_b, block_a), (base_c, block_a)):
        with pytest.raises(InvalidInput):
            codec.decode(f"{base}.{block}", filter_digest=b"d" * 12, partitions=4)
    # Another store's secret, the same base: refused too.
    with pytest.raises(InvalidInput):
        CursorCodec(b"t" * 32).decode(lines[0], filter_digest=b"d" * 12, partitions=4)
    # Other filters: refused as for any cursor.
    with pytest.raises(InvalidInput, match="other filters"):
        codec.decode(lines[0], filter_digest=b"x" * 12, partitions=4)
