"""GET /v1/reconciliation on both stores: the figures, the digest against the export, final
periods that never change afterwards, CSV, and bad input.

The app's clock is injected (ingest, finality and keys all read it) and the tenants have a
lateness window of 836 hours, so that events land in past periods of a known date around
Berlin's daylight-saving change of 29 March 2026; the digest pages are two events long, so
every walk crosses pages.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.api.reconciliation import CSV_COLUMNS
from tally.auth.service import Scope
from tally.bootstrap import Services, build
from tally.client import reconciliation_digest
from tally.events.digest import DigestAccumulator
from tally.events.log import ExportFilter, PeriodFigures
from tally.events.validation import validate_event
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.services.reconciliation import ReconciliationService
from tally.settings import Settings
from tally.store.interface import EventStore
from tally.store.sqlite import SQLiteStore
from tests.api.helpers import Clock, assert_problem, auth, parameters, post_events
from tests.conftest import open_store

BASE = datetime(2026, 3, 30, 12, 0, tzinfo=UTC)  # the day after Berlin's spring change
LATENESS = 836  # hours: below the 840-hour maximum, so a longer window is a valid request
BERLIN_DAYS = {
    "from": "2026-03-28T00:00:00+01:00",
    "to": "2026-03-31T00:00:00+02:00",
    "period": "day",
    "tz": "Europe/Berlin",
}


@dataclass
class Recon:
    client: TestClient
    clock: Clock
    services: Services
    admin: str
    writer: str
    usage: str
    reader: str

    def report(self, *events: dict[str, Any]) -> None:
        body = post_events(self.client, self.writer, {"events": list(events)}).json()
        assert body["accepted"] == len(events), body

    def rows(self, **params: str) -> list[dict[str, Any]]:
        response = self.client.get("/v1/reconciliation", params=params, headers=auth(self.usage))
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = json.loads(response.text, parse_float=Decimal)["rows"]
        return rows

    def exported(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The export's entries of one row's tenant, type and period."""
        params = {
            "tenant": row["tenant"],
            "type": row["type"],
            "time_from": row["period_start"],
            "time_to": row["period_end"],
            "limit": "10000",
        }
        response = self.client.get("/v1/events", params=params, headers=auth(self.reader))
        assert response.status_code == 200, response.text
        page = json.loads(response.text, parse_float=Decimal)
        assert not page["has_more"]
        events: list[dict[str, Any]] = page["events"]
        return events


def recon_app(settings: Settings, store: EventStore) -> Iterator[Recon]:
    clock = Clock(BASE)
    services = build(settings, store=store, clock=clock)
    services.reconciliation = ReconciliationService(
        store=store, keys=services.keys, clock=clock, page=2
    )
    registry = services.registry
    registry.create_tenant(TenantIn(id="acme", lateness_hours=LATENESS))
    registry.create_tenant(TenantIn(id="globex", lateness_hours=LATENESS))
    registry.create_application(ApplicationIn(id="vm"))

    def key(*scopes: Scope, **spec: Any) -> str:
        return registry.create_key(KeyIn.model_validate({"scopes": scopes, **spec})).key

    admin, writer = key(Scope.ADMIN), key(Scope.EVENTS_WRITE, application="vm")
    usage, reader = key(Scope.USAGE_READ), key(Scope.EVENTS_READ)
    try:
        with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
            yield Recon(client, clock, services, admin, writer, usage, reader)
    finally:
        services.committer.close()


@pytest.fixture
def recon(settings: Settings, store: EventStore) -> Iterator[Recon]:
    yield from recon_app(settings, store)


def ev(event_id: str, time: str, quantity: str = "0.1", **fields: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "tenant": "acme",
        "type": "compute.seconds",
        "quantity": quantity,
        "time": time,
        **fields,
    }


BIG = "12345678901234567890.123456789012345678"  # 38 digits: a float would round it
BERLIN_EVENTS = [
    ev("a1", "2026-03-28T10:00:00Z", "0.1", attributes={"sku": "std", "rate": 0.5}),
    ev("a2", "2026-03-28T22:59:59.999999Z", "0.2", subject="vm-1"),  # 23:59:59.999999 +01:00
    ev("a3", "2026-03-28T23:00:00Z", "0.3", attributes={"zone": "Zürich"}),  # 29th, 00:00 +01:00
    ev("a4", "2026-03-29T21:59:59Z", BIG, unit="s"),  # 29th, 23:59:59 +02:00
    ev("a5", "2026-03-29T22:00:00Z", "1"),  # 30th, 00:00 +02:00
    ev("b1", "2026-03-29T05:00:00Z", "7", type="storage.bytes", subject="vm-1", unit="B"),
    ev("g1", "2026-03-29T06:00:00Z", "2", tenant="globex", attributes={"gpu": True}),
]


def test_rows_hold_the_figures_of_each_tenant_type_and_berlin_day_across_dst(
    recon: Recon,
) -> None:
    recon.report(*BERLIN_EVENTS)

    rows = recon.rows(**BERLIN_DAYS)

    assert [
        (r["tenant"], r["type"], r["period_start"], r["period_end"], r["count"], r["sum"])
        for r in rows
    ] == [
        (
            "acme",
            "compute.seconds",
            "2026-03-28T00:00:00+01:00",
            "2026-03-29T00:00:00+01:00",
            2,
            "0.3",
        ),
        (
            "acme",
            "compute.seconds",
            "2026-03-29T00:00:00+01:00",
            "2026-03-30T00:00:00+02:00",  # 23 hours
            2,
            "12345678901234567890.423456789012345678",
        ),
        (
            "acme",
            "compute.seconds",
            "2026-03-30T00:00:00+02:00",
            "2026-03-31T00:00:00+02:00",
            1,
            "1",
        ),
        ("acme", "storage.bytes", "2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00", 1, "7"),
        (
            "globex",
            "compute.seconds",
            "2026-03-29T00:00:00+01:00",
            "2026-03-30T00:00:00+02:00",
            1,
            "2",
        ),
    ]
    received = BASE.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # the injected clock's now
    for row in rows:
        assert set(row) == {
            "tenant", "type", "period_start", "period_end", "count", "sum", "digest",
            "last_received_at", "cancelled", "final", "final_at",
        }  # fmt: skip
        assert row["cancelled"] == {"count": 0, "sum": "0"}
        assert row["last_received_at"] == received
        assert row["final"] is False
        entries = recon.exported(row)
        assert len(entries) == row["count"]
        assert row["digest"] == reconciliation_digest(entries)


def test_hour_rows_follow_the_wall_clock_and_each_digest_matches_its_export(
    recon: Recon,
) -> None:
    recon.report(*BERLIN_EVENTS)

    rows = recon.rows(**{**BERLIN_DAYS, "period": "hour", "tenant": "acme"})

    spans = {(r["type"], r["period_start"], r["period_end"]) for r in rows}
    assert ("compute.seconds", "2026-03-29T23:00:00+02:00", "2026-03-30T00:00:00+02:00") in spans
    assert ("compute.seconds", "2026-03-29T00:00:00+01:00", "2026-03-29T01:00:00+01:00") in spans
    assert sum(r["count"] for r in rows) == 6
    for row in rows:
        assert row["digest"] == reconciliation_digest(recon.exported(row))


def test_an_added_a_removed_or_an_altered_event_changes_its_periods_digest_only(
    recon: Recon, settings: Settings, tmp_path: Path
) -> None:
    # P1 = 28 March, P2 = 29 March, P3 = 30 March (UTC days).
    ours = [
        ev("x1", "2026-03-28T01:00:00Z"),
        ev("x2", "2026-03-28T02:00:00Z"),
        ev("y1", "2026-03-29T01:00:00Z"),
        ev("y2", "2026-03-29T02:00:00Z", attributes={"sku": "std"}),
        ev("z1", "2026-03-30T01:00:00Z"),
    ]
    # Another store (a SQLite file, whatever ours is) holding the same events but: x2 left
    # out, and y2 with another attribute value (same count, same sum).
    theirs = [e for e in ours if e["id"] not in ("x2", "y2")]
    theirs.append(ev("y2", "2026-03-29T02:00:00Z", attributes={"sku": "big"}))
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    other_store = open_store(other_url)
    other = recon_app(settings.model_copy(update={"database_url": other_url}), other_store)
    copy = next(other)
    try:
        recon.report(*ours)
        copy.report(*theirs)
        days = {"from": "2026-03-28T00:00:00Z", "to": "2026-03-31T00:00:00Z", "period": "day"}

        mine, its = recon.rows(**days), copy.rows(**days)

        assert [(r["count"], r["sum"]) for r in mine] == [(2, "0.2"), (2, "0.2"), (1, "0.1")]
        assert [(r["count"], r["sum"]) for r in its] == [(1, "0.1"), (2, "0.2"), (1, "0.1")]
        removed, altered, same = zip(mine, its, strict=True)
        assert removed[0]["digest"] != removed[1]["digest"]
        assert altered[0]["digest"] != altered[1]["digest"]
        assert same[0]["digest"] == same[1]["digest"]  # another store, the same events

        recon.report(ev("z2", "2026-03-30T02:00:00Z"))
        added = recon.rows(**days)

        assert [r["digest"] for r in added[:2]] == [r["digest"] for r in mine[:2]]
        assert added[2]["digest"] != mine[2]["digest"]
        assert added[2]["digest"] == reconciliation_digest(recon.exported(added[2]))
    finally:
        other.close()
        other_store.close()


def test_a_period_is_final_from_its_end_plus_the_lateness_window_and_never_changes(
    recon: Recon,
) -> None:
    recon.report(
        ev("f1", "2026-03-28T01:00:00Z", attributes={"sku": "std"}),
        ev("f2", "2026-03-28T23:00:00Z", "2.5"),
        ev("o1", "2026-03-29T01:00:00Z"),
    )
    days = {"from": "2026-03-28T00:00:00Z", "to": "2026-03-30T00:00:00Z", "period": "day"}
    first, second = recon.rows(**days)
    end = datetime(2026, 3, 29, tzinfo=UTC)
    final_at = end + timedelta(hours=LATENESS)
    assert first["final_at"] == final_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert second["final_at"] == (final_at + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    recon.clock.now = final_at - timedelta(microseconds=1)
    assert [r["final"] for r in recon.rows(**days)] == [False, False]
    # The last moment before final: an event can still join the period (and change it).
    late = ev("f3", "2026-03-28T23:59:59.999999Z")  # the cutoff itself is still in
    assert post_events(recon.client, recon.writer, late).json()["status"] == "accepted"
    recon.clock.now = final_at
    settled, still_open = recon.rows(**days)
    assert (settled["final"], still_open["final"]) == (True, False)
    assert (settled["count"], settled["sum"]) == (3, "2.7")

    # A late event is refused: the period's figures stay.
    too_late = post_events(recon.client, recon.writer, ev("f4", "2026-03-28T12:00:00Z"))
    assert too_late.status_code == 400
    assert too_late.json()["errors"][0]["pointer"] == "/time"
    # A longer lateness window would re-open it: refused, the window stays.
    admin = auth(recon.admin)
    longer = recon.client.patch("/v1/tenants/acme", json={"lateness_hours": 840}, headers=admin)
    assert assert_problem(longer, 409, "ERR-VAL-409")["type"] == "/problems/period-final"
    # A shorter one only makes periods final sooner.
    shorter = recon.client.patch("/v1/tenants/acme", json={"lateness_hours": 24}, headers=admin)
    assert shorter.status_code == 200, shorter.text
    again = recon.rows(**days)
    assert again[0] == {**settled, "final_at": again[0]["final_at"]}
    assert again[1]["final"] is True  # 30 March + 24 hours has passed
    recon.clock.now += timedelta(days=400)
    assert recon.rows(**days)[0] == again[0]

    # The one exception, documented: a shred destroys the attributes, so the digest of the
    # period becomes that of its events with attributes null and "shredded": true. Count,
    # sum, times and finality stay.
    recon.services.registry.shred_tenant("acme")
    shredded = recon.rows(**days)[0]
    assert {k: v for k, v in shredded.items() if k != "digest"} == {
        k: v for k, v in again[0].items() if k != "digest"
    }
    assert shredded["digest"] != again[0]["digest"]
    entries = recon.exported(shredded)
    assert all(e["shredded"] is True and e["attributes"] is None for e in entries)
    assert shredded["digest"] == reconciliation_digest(entries)


def test_without_a_tenant_a_key_gets_every_tenant_it_may_read(recon: Recon) -> None:
    recon.report(*BERLIN_EVENTS)
    registry = recon.services.registry
    acme_only = registry.create_key(KeyIn(scopes=[Scope.USAGE_READ], tenants=["acme"])).key

    everyone = recon.rows(**BERLIN_DAYS)
    response = recon.client.get("/v1/reconciliation", params=BERLIN_DAYS, headers=auth(acme_only))
    refused = recon.client.get(
        "/v1/reconciliation", params={**BERLIN_DAYS, "tenant": "globex"}, headers=auth(acme_only)
    )

    assert {r["tenant"] for r in everyone} == {"acme", "globex"}
    assert response.json()["rows"] == [r for r in everyone if r["tenant"] == "acme"]
    assert_problem(refused, 403, "ERR-AUTH-403")


def test_the_last_periods_of_the_calendar_answer(recon: Recon) -> None:
    end = {"from": "9999-12-01T00:00:00Z", "to": "9999-12-31T22:00:00Z", "period": "month"}

    assert recon.rows(**{**BERLIN_DAYS, **end}) == []


def test_an_empty_range_or_period_has_no_rows(recon: Recon) -> None:
    recon.report(*BERLIN_EVENTS)
    instant = "2026-03-29T00:00:00Z"

    assert recon.rows(**{**BERLIN_DAYS, "from": instant, "to": instant}) == []
    before = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-28T00:00:00Z", "period": "month"}
    assert recon.rows(**before) == []  # periods without events have no row


def test_csv_has_one_column_per_field_and_the_same_figures(recon: Recon) -> None:
    recon.report(*BERLIN_EVENTS)
    rows = recon.rows(**BERLIN_DAYS)

    response = recon.client.get(
        "/v1/reconciliation",
        params=BERLIN_DAYS,
        headers={**auth(recon.usage), "Accept": "text/csv"},
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(response.text, newline="")))
    assert list(table[0]) == list(CSV_COLUMNS)
    assert table == [
        {
            **{k: str(v) for k, v in row.items() if k not in ("cancelled", "final")},
            "final": "false",
            "cancelled_count": "0",
            "cancelled_sum": "0",
        }
        for row in rows
    ]
    xml = recon.client.get(
        "/v1/reconciliation",
        params=BERLIN_DAYS,
        headers={**auth(recon.usage), "Accept": "text/xml"},
    )
    assert_problem(xml, 406, "ERR-VAL-400")


@pytest.mark.parametrize(
    ("change", "parameter"),
    [
        ({"period": "week"}, "period"),
        ({"period": ""}, "period"),
        ({"tz": "Mars/Olympus_Mons"}, "tz"),
        ({"tz": "../../etc/passwd"}, "tz"),
        ({"from": "2026-04-01T00:00:00Z"}, "from"),  # after `to`
        ({"from": "2026-03-28"}, "from"),
        ({"to": "yesterday"}, "to"),
        ({"from": "2025-01-01T00:00:00Z", "period": "hour"}, "period"),  # > 10,000 periods
        ({"to": "9999-12-31T23:30:00Z"}, "to"),  # year 10000 in Berlin
        ({"tenant": ""}, "tenant"),
        ({"limit": "5"}, "limit"),  # not a parameter of this route
    ],
)
def test_bad_input_is_a_problem_naming_the_parameter(
    recon: Recon, change: dict[str, str], parameter: str
) -> None:
    response = recon.client.get(
        "/v1/reconciliation", params={**BERLIN_DAYS, **change}, headers=auth(recon.usage)
    )

    assert parameter in parameters(assert_problem(response, 400, "ERR-VAL-400"))


@pytest.mark.parametrize("missing", ["from", "to", "period"])
def test_from_to_and_period_are_required(recon: Recon, missing: str) -> None:
    params = {k: v for k, v in BERLIN_DAYS.items() if k != missing}
    response = recon.client.get("/v1/reconciliation", params=params, headers=auth(recon.usage))

    assert parameters(assert_problem(response, 400, "ERR-VAL-400")) == [missing]


def test_the_digest_of_a_row_is_the_accumulator_of_its_events(recon: Recon) -> None:
    # The same figure computed by hand: DigestAccumulator over the exported entries.
    recon.report(*BERLIN_EVENTS)
    row = recon.rows(**BERLIN_DAYS)[1]
    accumulator = DigestAccumulator()
    for entry in recon.exported(row):
        accumulator.add(entry, cancelled=False)

    assert row["digest"] == accumulator.hexdigest()


class ArrivingStore(SQLiteStore):
    """A real SQLite store in which an event arrives right after the figures are read, before
    the digests are (`arrivals` times): the race between the two reads, made certain."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.arrive: Callable[[int], None] = lambda _: None
        self.arrivals = 0
        self.reads = 0

    def period_figures(
        self, filters: ExportFilter, periods: Sequence[tuple[datetime, datetime]]
    ) -> list[PeriodFigures]:
        figures = super().period_figures(filters, periods)
        self.reads += 1
        if self.reads <= self.arrivals:
            self.arrive(self.reads)
        return figures


@pytest.mark.parametrize(("arrivals", "status"), [(1, 200), (2, 200), (3, 503)])
def test_figures_and_digests_are_read_again_until_they_saw_the_same_events(
    tmp_path: Path, keyring_file: Path, arrivals: int, status: int
) -> None:
    store = ArrivingStore(tmp_path / "tally.db")
    store.migrate()
    settings = Settings(database_url=f"sqlite:///{store.path}", keyring=str(keyring_file))
    app = recon_app(settings, store)
    recon = next(app)
    try:
        recon.report(ev("r0", "2026-03-29T01:00:00Z"))
        writer = recon.services.authenticator.authenticate(f"Bearer {recon.writer}")

        def arrive(n: int) -> None:
            draft = validate_event(ev(f"r{n}", "2026-03-29T02:00:00Z"))
            report = recon.services.ingest.ingest(writer, [draft], [f"r{n}"])
            assert report.results[0].status == "accepted"

        store.arrive, store.arrivals = arrive, arrivals
        days = {"from": "2026-03-29T00:00:00Z", "to": "2026-03-30T00:00:00Z", "period": "day"}
        response = recon.client.get("/v1/reconciliation", params=days, headers=auth(recon.usage))

        assert response.status_code == status, response.text
        if status == 503:
            assert_problem(response, 503, "ERR-SYS-503")
            return
        (row,) = response.json()["rows"]
        assert row["count"] == 1 + arrivals
        assert row["digest"] == reconciliation_digest(recon.exported(row))
    finally:
        app.close()
        store.close()


def test_events_at_the_same_instant_are_each_counted_once_across_digest_pages(
    recon: Recon,
) -> None:
    # Pages of two: the walk resumes inside a run of equal times, by application and id.
    recon.report(*(ev(f"same-{i}", "2026-03-29T12:00:00Z", str(i)) for i in range(5)))
    days = {"from": "2026-03-29T00:00:00Z", "to": "2026-03-30T00:00:00Z", "period": "day"}

    (row,) = recon.rows(**days)

    assert (row["count"], row["sum"]) == (5, "10")
    assert row["digest"] == reconciliation_digest(recon.exported(row))


def test_a_cancellation_moves_its_event_to_cancelled_changes_the_digest_and_leaves_usage(
    recon: Recon,
) -> None:
    recon.report(*BERLIN_EVENTS)
    day = {**BERLIN_DAYS, "tenant": "acme", "from": "2026-03-28T00:00:00+01:00"}
    [before] = [r for r in recon.rows(**day) if r["period_start"].startswith("2026-03-28")]

    cancelled = recon.client.post(
        "/v1/events/vm/a2/cancel", json={"reason": "reported twice"}, headers=auth(recon.writer)
    )
    assert cancelled.status_code == 200, cancelled.text

    [after] = [r for r in recon.rows(**day) if r["period_start"].startswith("2026-03-28")]
    assert (before["count"], before["sum"]) == (2, "0.3")
    assert (after["count"], after["sum"]) == (1, "0.1")
    assert after["cancelled"] == {"count": 1, "sum": "0.2"}
    assert after["digest"] != before["digest"]
    # A billing system that follows the export sees the cancellation and proves the new digest.
    entries = recon.exported(after)
    assert {e["kind"] for e in entries} == {"event", "cancellation"}
    assert after["digest"] == reconciliation_digest(entries)
    # Usage leaves the cancelled event out of its sum.
    usage = recon.client.get(
        "/v1/usage",
        params={"tenant": "acme", "from": day["from"], "to": "2026-03-29T00:00:00+01:00"},
        headers=auth(recon.usage),
    )
    assert usage.status_code == 200, usage.text
    assert [row["value"] for row in usage.json()["rows"]] == ["0.1"]
