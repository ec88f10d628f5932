"""The export's own read (`read_rows`): plain rows whose JSON is, byte for byte, what the
export wrote from objects before (json.dumps of the fields, formatted in Python)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tally.crypto.records import DataKey
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


def test_a_cursor_walk_seals_each_position_it_moves_to() -> None:
    codec = CursorCodec(b"s" * 32)
    digest, epoch = b"d" * 12, b"e" * 16
    walk = codec.walk([5, 6, 7, 8], 2, digest, epoch)
    first = walk.current()
    walk.move(1, 60, 1)
    moved = walk.current()
    walk.move(3, 80, 3)

    assert codec.decode(first, filter_digest=digest, partitions=4) == Position(
        [5, 6, 7, 8], 2, epoch
    )
    assert codec.decode(moved, filter_digest=digest, partitions=4) == Position(
        [5, 60, 7, 8], 1, epoch
    )
    assert codec.decode(walk.current(), filter_digest=digest, partitions=4) == Position(
        [5, 60, 7, 80], 3, epoch
    )
    # The same place twice: two cursors that differ, of the same length as `encode`'s.
    assert walk.current() != walk.current()
    assert len(walk.current()) == len(codec.encode([5, 60, 7, 80], 3, digest, epoch))
