"""GET /v1/usage and /v1/meters on both stores: exact aggregates computed by the database,
windows in a time zone across real daylight-saving changes, groups by attribute through keyed
tokens, CSV, tenant restrictions and bad input."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.auth.service import Scope
from tally.bootstrap import Services, build
from tally.events.validation import EventIn
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.services.ingest import seal_event
from tally.services.usage import backfill_tokens
from tally.settings import Settings
from tally.store.interface import EventStore
from tests.api.helpers import assert_problem, auth, parameters, pointers, post_events


class Clock:
    """A clock the test moves: events months old are inside the lateness window."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@dataclass
class Usage:
    client: TestClient
    services: Services
    clock: Clock
    admin: str
    writer: str
    usage: str
    acme_usage: str
    reader: str

    def send(self, *events: dict[str, Any]) -> None:
        answer = post_events(self.client, self.writer, {"events": list(events)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["accepted"] == len(events), answer.text

    def get(self, key: str | None = None, path: str = "/v1/usage", **params: Any) -> Any:
        response = self.client.get(path, params=params, headers=auth(key or self.usage))
        assert response.status_code == 200, response.text
        return response.json()


_ids = iter(range(10**9))


def ev(time: str, quantity: str = "1", tenant: str = "acme", **fields: Any) -> dict[str, Any]:
    return {
        "id": f"u-{next(_ids)}",
        "tenant": tenant,
        "type": fields.pop("type", "compute.seconds"),
        "quantity": quantity,
        "time": time,
        **fields,
    }


@pytest.fixture
def u(settings: Settings, store: EventStore) -> Iterator[Usage]:
    clock = Clock(datetime(2026, 3, 1, tzinfo=UTC))
    services = build(settings, store=store, clock=clock)
    registry = services.registry
    for tenant in ("acme", "globex"):
        registry.create_tenant(TenantIn(id=tenant, lateness_hours=840))
    registry.create_application(ApplicationIn(id="vm"))

    def key(*scopes: Scope, **spec: Any) -> str:
        return registry.create_key(KeyIn.model_validate({"scopes": scopes, **spec})).key

    keys = {
        "admin": key(Scope.ADMIN),
        "writer": key(Scope.EVENTS_WRITE, application="vm"),
        "usage": key(Scope.USAGE_READ),
        "acme_usage": key(Scope.USAGE_READ, tenants=["acme"]),
        "reader": key(Scope.EVENTS_READ),
    }
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        yield Usage(client, services, clock, **keys)
    services.committer.close()


def at(clock: Clock, day: datetime) -> None:
    clock.at = day


def test_sums_are_exact_where_a_float_would_round(u: Usage) -> None:
    at(u.clock, datetime(2026, 3, 2, tzinfo=UTC))
    big = "12345678901234567890.123456789012345678"
    u.send(*[ev("2026-03-01T10:00:00Z", "0.1") for _ in range(10)])
    u.send(ev("2026-03-01T11:00:00Z", big, type="big"), ev("2026-03-01T11:00:00Z", big, type="big"))
    found = u.get(**{"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z"}, group_by="type")
    values = {row["group"]["type"]: row["value"] for row in found["rows"]}
    assert values == {"big": "24691357802469135780.246913578024691356", "compute.seconds": "1"}
    assert found["from"] == "2026-03-01T00:00:00+00:00"
    assert found["window"] == "none" and found["tz"] == "UTC" and found["aggregation"] == "sum"


def test_every_aggregation(u: Usage) -> None:
    at(u.clock, datetime(2026, 3, 2, tzinfo=UTC))
    u.send(
        ev("2026-03-01T10:00:00Z", "5", subject="vm-1"),
        ev("2026-03-01T10:30:00Z", "10", subject="vm-2"),
        ev("2026-03-01T10:45:00Z", "9", subject="vm-1"),
        ev("2026-03-01T11:10:00Z", "2.5"),
    )
    # Two events at the same latest time: the later in the export log wins.
    u.send(ev("2026-03-01T11:20:00Z", "7"))
    u.send(ev("2026-03-01T11:20:00Z", "3"))
    span = {"from": "2026-03-01T10:00:00Z", "to": "2026-03-01T12:00:00Z", "window": "hour"}
    expected = {
        "sum": ["24", "12.5"],
        "count": [3, 3],
        "min": ["5", "2.5"],
        "max": ["10", "7"],  # compared as decimals: text would say '9' > '10'
        "latest": ["9", "3"],
    }
    for aggregation, values in expected.items():
        found = u.get(**span, aggregation=aggregation)
        assert [row["value"] for row in found["rows"]] == values, aggregation
        assert [row["window_start"] for row in found["rows"]] == [
            "2026-03-01T10:00:00+00:00",
            "2026-03-01T11:00:00+00:00",
        ]
    found = u.get(**span, aggregation="unique_count", unique_of="subject")
    assert [row["value"] for row in found["rows"]] == [2, 0]


def test_day_and_month_windows_follow_berlin_across_daylight_saving(u: Usage) -> None:
    # 2026-03-29 has 23 hours in Berlin, 2026-10-25 has 25.
    at(u.clock, datetime(2026, 3, 31, tzinfo=UTC))
    u.send(
        ev("2026-03-28T23:30:00Z", "1"),  # 2026-03-29 00:30 in Berlin (+01:00)
        ev("2026-03-29T21:59:00Z", "2"),  # 23:59 (+02:00): still the 29th
        ev("2026-03-29T22:00:00Z", "4"),  # the 30th, 00:00 (+02:00)
    )
    at(u.clock, datetime(2026, 10, 27, tzinfo=UTC))
    u.send(
        ev("2026-10-24T22:00:00Z", "8"),  # 2026-10-25 00:00 (+02:00)
        ev("2026-10-25T22:59:00Z", "16"),  # 23:59 (+01:00): still the 25th
        ev("2026-10-25T23:00:00Z", "32"),  # the 26th
    )
    march = u.get(
        **{"from": "2026-03-29T00:00:00+01:00", "to": "2026-03-31T00:00:00+02:00"},
        window="day",
        tz="Europe/Berlin",
    )
    assert [(r["window_start"], r["window_end"], r["value"]) for r in march["rows"]] == [
        ("2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00", "3"),
        ("2026-03-30T00:00:00+02:00", "2026-03-31T00:00:00+02:00", "4"),
    ]
    october = u.get(
        **{"from": "2026-10-25T00:00:00+02:00", "to": "2026-10-27T00:00:00+01:00"},
        window="day",
        tz="Europe/Berlin",
    )
    assert [(r["window_start"], r["window_end"], r["value"]) for r in october["rows"]] == [
        ("2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00", "24"),
        ("2026-10-26T00:00:00+01:00", "2026-10-27T00:00:00+01:00", "32"),
    ]
    months = u.get(
        **{"from": "2026-01-01T00:00:00+01:00", "to": "2027-01-01T00:00:00+01:00"},
        window="month",
        tz="Europe/Berlin",
    )
    assert [(r["window_start"], r["window_end"], r["value"]) for r in months["rows"]] == [
        ("2026-03-01T00:00:00+01:00", "2026-04-01T00:00:00+02:00", "7"),
        ("2026-10-01T00:00:00+02:00", "2026-11-01T00:00:00+01:00", "56"),
    ]
    # In UTC the first Berlin day's events fall on two days.
    utc = u.get(**{"from": "2026-03-28T00:00:00Z", "to": "2026-03-31T00:00:00Z"}, window="day")
    assert [r["value"] for r in utc["rows"]] == ["1", "6"]


def test_group_by_attributes_returns_the_real_values_across_tenants(u: Usage) -> None:
    at(u.clock, datetime(2026, 3, 2, tzinfo=UTC))
    u.send(
        ev("2026-03-01T10:00:00Z", "1", attributes={"sku": "std", "user": "ann"}),
        ev("2026-03-01T10:00:00Z", "2", attributes={"sku": "std", "user": "bob"}),
        ev("2026-03-01T10:00:00Z", "4", attributes={"sku": "gpu", "user": "ann", "n": 1.5}),
        ev("2026-03-01T10:00:00Z", "8", tenant="globex", attributes={"sku": "std", "user": "ann"}),
        ev("2026-03-01T10:00:00Z", "16", subject="vm-9"),
    )
    span = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z"}
    by_sku = u.get(**span, group_by="attributes.sku")
    assert [(r["group"], r["value"]) for r in by_sku["rows"]] == [
        ({"attributes.sku": "gpu"}, "4"),
        ({"attributes.sku": "std"}, "11"),  # acme's and globex's std together
        ({"attributes.sku": None}, "16"),
    ]
    both = u.get(**span, group_by=["tenant", "attributes.sku", "subject"], aggregation="count")
    assert [(r["group"], r["value"]) for r in both["rows"]] == [
        ({"tenant": "acme", "attributes.sku": "gpu", "subject": None}, 1),
        ({"tenant": "acme", "attributes.sku": "std", "subject": None}, 2),
        ({"tenant": "acme", "attributes.sku": None, "subject": "vm-9"}, 1),
        ({"tenant": "globex", "attributes.sku": "std", "subject": None}, 1),
    ]
    users = u.get(**span, aggregation="unique_count", unique_of="attributes.user")
    assert [r["value"] for r in users["rows"]] == [2]  # ann (in both tenants) and bob
    per_tenant = u.get(
        **span, aggregation="unique_count", unique_of="attributes.user", group_by="tenant"
    )
    assert [(r["group"]["tenant"], r["value"]) for r in per_tenant["rows"]] == [
        ("acme", 2),
        ("globex", 1),
    ]
    numbers = u.get(**span, group_by="attributes.n", aggregation="count")
    assert [r["group"]["attributes.n"] for r in numbers["rows"]] == ["1.5", None]


def test_filters_and_a_tenant_restricted_key(u: Usage) -> None:
    at(u.clock, datetime(2026, 3, 2, tzinfo=UTC))
    u.send(ev("2026-03-01T10:00:00Z", "1"), ev("2026-03-01T10:00:00Z", "2", tenant="globex"))
    span = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z"}
    assert [r["value"] for r in u.get(u.acme_usage, **span)["rows"]] == ["1"]
    assert [r["value"] for r in u.get(**span)["rows"]] == ["3"]
    assert [r["value"] for r in u.get(**span, tenant="globex")["rows"]] == ["2"]
    assert u.get(**span, type="other")["rows"] == []
    refused = u.client.get(
        "/v1/usage", params={**span, "tenant": "globex"}, headers=auth(u.acme_usage)
    )
    assert_problem(refused, 403, "ERR-AUTH-403")
    wrong_scope = u.client.get("/v1/usage", params=span, headers=auth(u.reader))
    assert_problem(wrong_scope, 403, "ERR-AUTH-403")


def test_csv_reads_back_with_the_csv_module(u: Usage) -> None:
    at(u.clock, datetime(2026, 3, 2, tzinfo=UTC))
    u.send(ev("2026-03-01T10:00:00Z", "1.5", attributes={"sku": 'a,"b"'}))
    response = u.client.get(
        "/v1/usage",
        params={
            "from": "2026-03-01T00:00:00Z",
            "to": "2026-03-02T00:00:00Z",
            "group_by": ["attributes.sku", "tenant"],
        },
        headers={**auth(u.usage), "Accept": "text/csv"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert rows == [
        {
            "window_start": "2026-03-01T00:00:00+00:00",
            "window_end": "2026-03-02T00:00:00+00:00",
            "attributes.sku": 'a,"b"',
            "tenant": "acme",
            "value": "1.5",
        }
    ]
    empty = u.client.get(
        "/v1/usage",
        params={
            "from": "2026-01-01T00:00:00Z",
            "to": "2026-01-02T00:00:00Z",
            "group_by": "subject",
        },
        headers={**auth(u.usage), "Accept": "text/csv"},
    )
    assert empty.text == "window_start,window_end,subject,value\r\n"  # the header, no rows


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"window": "week"}, "window"),
        ({"aggregation": "avg"}, "aggregation"),
        ({"group_by": "colour"}, "group_by"),
        ({"group_by": ["type", "type"]}, "group_by"),
        ({"tz": "Mars/Olympus"}, "tz"),
        ({"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"}, "from"),
        ({"from": "2000-01-01T00:00:00Z", "window": "minute"}, "window"),
        ({"aggregation": "unique_count"}, "unique_of"),
        ({"aggregation": "unique_count", "unique_of": "colour"}, "unique_of"),
        ({"unique_of": "subject"}, "unique_of"),
        ({"from": "yesterday"}, "from"),
        ({"to": None}, "to"),
    ],
)
def test_bad_input_names_the_parameter(u: Usage, params: dict[str, Any], named: str) -> None:
    query = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z", **params}
    query = {k: v for k, v in query.items() if v is not None}
    problem = assert_problem(
        u.client.get("/v1/usage", params=query, headers=auth(u.usage)), 400, "ERR-VAL-400"
    )
    assert named in parameters(problem), problem


def test_meters_round_trip(u: Usage) -> None:
    at(u.clock, datetime(2026, 3, 2, tzinfo=UTC))
    u.send(
        ev("2026-03-01T10:00:00Z", "1", attributes={"sku": "std"}),
        ev("2026-03-01T11:00:00Z", "2", attributes={"sku": "std"}),
        ev("2026-03-01T11:00:00Z", "4", type="other"),
    )
    spec = {
        "id": "vcpu",
        "type": "compute.seconds",
        "aggregation": "sum",
        "group_by": ["attributes.sku"],
        "filters": {"application": "vm"},
        "unit": "second",
    }
    created = u.client.post("/v1/meters", json=spec, headers=auth(u.admin))
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "vcpu"
    again = u.client.post("/v1/meters", json=spec, headers=auth(u.admin))
    assert_problem(again, 409, "ERR-VAL-409")
    bad = u.client.post(
        "/v1/meters", json={**spec, "id": "x", "aggregation": "avg"}, headers=auth(u.admin)
    )
    assert "/aggregation" in pointers(assert_problem(bad, 400, "ERR-VAL-400"))
    bad = u.client.post(
        "/v1/meters", json={**spec, "id": "x", "group_by": ["colour"]}, headers=auth(u.admin)
    )
    assert "/group_by" in pointers(assert_problem(bad, 400, "ERR-VAL-400"))
    assert [m["id"] for m in u.get(path="/v1/meters")["meters"]] == ["vcpu"]
    assert u.get(path="/v1/meters/vcpu")["unit"] == "second"
    span = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z"}
    metered = u.get(path="/v1/meters/vcpu/usage", **span, window="hour", tenant="acme")
    direct = u.get(
        **span, window="hour", tenant="acme", type="compute.seconds", group_by="attributes.sku"
    )
    assert metered["rows"] == direct["rows"]
    assert [r["value"] for r in metered["rows"]] == ["1", "2"]
    assert metered["meter"] == "vcpu"
    assert u.client.delete("/v1/meters/vcpu", headers=auth(u.admin)).status_code == 204
    assert_problem(u.client.get("/v1/meters/vcpu", headers=auth(u.usage)), 404, "ERR-RES-404")
    assert_problem(u.client.delete("/v1/meters/vcpu", headers=auth(u.admin)), 404, "ERR-RES-404")
    actions = [e["action"] for e in u.get(u.admin, path="/v1/audit")["entries"]]
    assert "meter.create" in actions and "meter.delete" in actions


def test_windows_are_cut_to_the_range(u: Usage) -> None:
    at(u.clock, datetime(2026, 3, 2, tzinfo=UTC))
    u.send(ev("2026-03-01T10:15:00Z", "1"), ev("2026-03-01T10:05:00Z", "1"))
    found = u.get(**{"from": "2026-03-01T10:10:00Z", "to": "2026-03-01T10:20:00Z"}, window="hour")
    assert [(r["window_start"], r["window_end"], r["value"]) for r in found["rows"]] == [
        ("2026-03-01T10:10:00+00:00", "2026-03-01T10:20:00+00:00", "1")
    ]


def test_reindex_gives_old_events_their_tokens_once(u: Usage) -> None:
    at(u.clock, datetime(2026, 3, 2, tzinfo=UTC))
    store, keys = u.services.store, u.services.keys
    cipher = keys.ciphers_of(["acme"])["acme"]
    assert cipher is not None
    # Events as stored before migration 0006: sealed attributes, no tokens, no dictionary.
    old = [
        dataclasses.replace(
            seal_event(
                EventIn.model_validate(
                    ev("2026-03-01T10:00:00Z", q, attributes={"sku": s})
                ).draft(),
                application="vm",
                region="eu-west",
                cipher=cipher,
            ),
            attribute_tokens=None,
            dictionary=(),
        )
        for q, s in (("1", "std"), ("2", "gpu"), ("4", "std"))
    ]
    store.append(old, received_at=u.clock())
    span = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z"}
    before = u.get(**span, group_by="attributes.sku")
    assert [(r["group"]["attributes.sku"], r["value"]) for r in before["rows"]] == [(None, "7")]

    assert list(backfill_tokens(store, keys, batch=2)) == [2, 1]
    assert list(backfill_tokens(store, keys, batch=2)) == []  # resumable: nothing left

    after = u.get(**span, group_by="attributes.sku")
    assert [(r["group"]["attributes.sku"], r["value"]) for r in after["rows"]] == [
        ("gpu", "2"),
        ("std", "5"),
    ]
    # Still append-only: tokens once set (and every other column) never change.
    with pytest.raises(Exception, match="append-only"), store._write() as session:  # type: ignore[attr-defined]
        session.run("UPDATE events SET attribute_tokens = '{}'")


def test_a_shredded_tenants_attributes_group_as_null_and_its_quantities_still_count(
    u: Usage,
) -> None:
    at(u.clock, datetime(2026, 3, 2, tzinfo=UTC))
    u.send(
        ev("2026-03-01T10:00:00Z", "1", attributes={"sku": "std"}),
        ev("2026-03-01T10:00:00Z", "2", tenant="globex", attributes={"sku": "std"}),
    )
    u.services.registry.shred_tenant("acme")
    span = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z"}
    found = u.get(**span, group_by=["tenant", "attributes.sku"])
    assert [(r["group"], r["value"]) for r in found["rows"]] == [
        ({"tenant": "acme", "attributes.sku": None}, "1"),
        ({"tenant": "globex", "attributes.sku": "std"}, "2"),
    ]
