"""GET /v1/events: cursor pages, polling, filters and the cursor's integrity."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.bootstrap import Services, build
from tally.errors import InvalidInput
from tally.events.log import ExportFilter, partition_of
from tally.settings import Settings
from tests.api.helpers import (
    assert_problem,
    at,
    auth,
    export_all,
    parameters,
    post_events,
)
from tests.conftest import World, event, open_store


def page(client: TestClient, key: str, **params: Any) -> dict[str, Any]:
    response = client.get("/v1/events", params=params, headers=auth(key))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"events", "next_cursor", "has_more"}
    return body


def follow(client: TestClient, key: str, **params: Any) -> tuple[list[dict[str, Any]], str, int]:
    """(events, final cursor, number of pages) from following next_cursor until has_more is
    false."""
    events: list[dict[str, Any]] = []
    pages = 0
    while True:
        body = page(client, key, **params)
        pages += 1
        assert len(body["events"]) <= params.get("limit", 1000)
        events.extend(body["events"])
        params["cursor"] = body["next_cursor"]
        if not body["has_more"]:
            return events, body["next_cursor"], pages


def test_empty_export_has_no_events_and_no_more(client: TestClient, world: World) -> None:
    body = page(client, world.reader)
    assert body["events"] == []
    assert body["has_more"] is False
    assert body["next_cursor"]


def test_paging_250_events_by_7_returns_each_exactly_once(client: TestClient, world: World) -> None:
    tenants = ["acme", "globex"]
    batch = {"events": [event(f"p-{i:03d}", tenant=tenants[i % 2]) for i in range(250)]}
    assert post_events(client, world.writer, batch).json()["accepted"] == 250
    events, _, pages = follow(client, world.reader, limit=7)
    ids = [e["id"] for e in events]
    assert len(ids) == 250
    assert set(ids) == {f"p-{i:03d}" for i in range(250)}
    assert pages >= 250 // 7


def test_exported_events_carry_every_field(client: TestClient, world: World) -> None:
    sent = event(
        "e-1",
        subject="user-7",
        unit="s",
        quantity="2.50",
        attributes={"sku": "a1", "n": 3, "ok": True},
    )
    assert post_events(client, world.writer, sent).status_code == 200
    (got,) = page(client, world.reader)["events"]
    assert set(got) == {
        "kind",
        "id",
        "application",
        "tenant",
        "type",
        "quantity",
        "time",
        "subject",
        "unit",
        "attributes",
        "region",
        "received_at",
    }
    assert got["quantity"] == "2.5"
    assert (got["subject"], got["unit"], got["region"]) == ("user-7", "s", "eu-west")
    assert got["attributes"] == {"sku": "a1", "n": 3, "ok": True}
    assert got["time"] == sent["time"]


def test_polling_with_the_final_cursor_returns_only_new_events(
    client: TestClient, world: World
) -> None:
    first = {"events": [event(f"a-{i}") for i in range(10)]}
    assert post_events(client, world.writer, first).json()["accepted"] == 10
    events, cursor, _ = follow(client, world.reader, limit=3)
    assert len(events) == 10
    empty = page(client, world.reader, limit=3, cursor=cursor)
    assert empty["events"] == []
    assert empty["has_more"] is False
    second = {"events": [event(f"b-{i}") for i in range(5)] + [event("a-0", quantity="1")]}
    post_events(client, world.writer, second)
    later, _, _ = follow(client, world.reader, limit=3, cursor=empty["next_cursor"])
    assert sorted(e["id"] for e in later) == [f"b-{i}" for i in range(5)]


@pytest.fixture
def catalogue(client: TestClient, world: World) -> dict[str, str]:
    """Events spread over tenants, applications, types, subjects and times; returns the times."""
    admin = auth(world.admin)
    assert client.post("/v1/applications", json={"id": "db"}, headers=admin).status_code == 201
    db_writer = client.post(
        "/v1/keys", json={"scopes": ["events:write"], "application": "db"}, headers=admin
    ).json()["key"]
    times = {
        "t0": at(timedelta(hours=-3)),
        "t1": at(timedelta(hours=-2)),
        "t2": at(timedelta(hours=-1)),
    }
    batch = {
        "events": [
            event("v-0", time=times["t0"], subject="alice"),
            event("v-1", time=times["t1"], subject="bob", type="storage.gib_hours"),
            event("v-2", time=times["t2"], subject="alice", tenant="globex"),
            event("v-3", time=times["t1"], tenant="globex", type="storage.gib_hours"),
        ]
    }
    assert post_events(client, world.writer, batch).json()["accepted"] == 4
    db_batch = {"events": [event("d-0", time=times["t0"]), event("d-1", time=times["t2"])]}
    assert post_events(client, db_writer, db_batch).json()["accepted"] == 2
    return times


def ids_of(client: TestClient, world: World, **filters: Any) -> list[str]:
    return sorted(e["id"] for e in export_all(client, world.reader, **filters))


def test_filter_by_tenant(client: TestClient, world: World, catalogue: dict[str, str]) -> None:
    assert ids_of(client, world, tenant="globex") == ["v-2", "v-3"]
    assert ids_of(client, world, tenant="acme") == ["d-0", "d-1", "v-0", "v-1"]
    assert ids_of(client, world, tenant="initech") == []


def test_filter_by_application(client: TestClient, world: World, catalogue: dict[str, str]) -> None:
    assert ids_of(client, world, application="db") == ["d-0", "d-1"]
    assert ids_of(client, world, application="vm") == ["v-0", "v-1", "v-2", "v-3"]


def test_filter_by_type(client: TestClient, world: World, catalogue: dict[str, str]) -> None:
    assert ids_of(client, world, type="storage.gib_hours") == ["v-1", "v-3"]


def test_filter_by_subject(client: TestClient, world: World, catalogue: dict[str, str]) -> None:
    assert ids_of(client, world, subject="alice") == ["v-0", "v-2"]


def test_filter_by_event_time_is_half_open(
    client: TestClient, world: World, catalogue: dict[str, str]
) -> None:
    t0, t1, t2 = catalogue["t0"], catalogue["t1"], catalogue["t2"]
    assert ids_of(client, world, time_from=t1, time_to=t2) == ["v-1", "v-3"]
    assert ids_of(client, world, time_from=t0, time_to=t1) == ["d-0", "v-0"]
    assert ids_of(client, world, time_from=t2) == ["d-1", "v-2"]
    assert ids_of(client, world, time_to=t0) == []
    assert ids_of(client, world, time_from=t1, time_to=t1) == []


def test_filters_combine(client: TestClient, world: World, catalogue: dict[str, str]) -> None:
    found = ids_of(
        client,
        world,
        tenant="acme",
        application="vm",
        type="compute.vcpu_seconds",
        subject="alice",
        time_from=catalogue["t0"],
        time_to=catalogue["t2"],
    )
    assert found == ["v-0"]


def test_filtered_paging_follows_the_filter_to_the_end(
    client: TestClient, world: World, catalogue: dict[str, str]
) -> None:
    events, cursor, _ = follow(client, world.reader, limit=1, application="vm")
    assert sorted(e["id"] for e in events) == ["v-0", "v-1", "v-2", "v-3"]
    more = page(client, world.reader, limit=1, application="vm", cursor=cursor)
    assert more["events"] == []


def test_time_filters_before_year_1000_compare_as_times(
    client: TestClient, world: World, catalogue: dict[str, str]
) -> None:
    every = ids_of(client, world)
    assert every == ["d-0", "d-1", "v-0", "v-1", "v-2", "v-3"]
    assert ids_of(client, world, time_from="0999-01-01T00:00:00Z") == every
    assert ids_of(client, world, time_from="1000-01-01T00:00:00Z") == every
    assert ids_of(client, world, time_to="0999-12-31T23:59:59Z") == []
    assert (
        ids_of(client, world, time_from="0001-01-01T00:00:00Z", time_to="1000-01-01T00:00:00Z")
        == []
    )
    assert (
        ids_of(client, world, time_from="0999-06-01T00:00:00Z", time_to="2999-01-01T00:00:00Z")
        == every
    )


def test_time_filter_with_offset_means_the_same_instant(
    client: TestClient, world: World, catalogue: dict[str, str]
) -> None:
    t1 = catalogue["t1"]
    assert ids_of(client, world, time_from=t1.replace("Z", "+00:00")) == ids_of(
        client, world, time_from=t1
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("time_from", "2026-01-01T00:00:00"),
        ("time_to", "yesterday"),
        ("type", "Not A Type"),
        ("tenant", "-bad"),
        ("limit", "many"),
    ],
)
def test_invalid_filter_is_a_400_naming_the_parameter(
    client: TestClient, world: World, name: str, value: str
) -> None:
    response = client.get("/v1/events", params={name: value}, headers=auth(world.reader))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert name in parameters(problem)


def test_time_from_after_time_to_is_a_400(client: TestClient, world: World) -> None:
    params = {"time_from": at(timedelta(hours=-1)), "time_to": at(timedelta(hours=-2))}
    response = client.get("/v1/events", params=params, headers=auth(world.reader))
    assert parameters(assert_problem(response, 400, "ERR-VAL-400")) == ["time_from"]


@pytest.mark.parametrize("limit", [0, -1, 10_001])
def test_limit_outside_1_to_10000_is_a_400_naming_limit(
    client: TestClient, world: World, limit: int
) -> None:
    response = client.get("/v1/events", params={"limit": limit}, headers=auth(world.reader))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert parameters(problem) == ["limit"]


def test_limit_of_10000_is_allowed(client: TestClient, world: World) -> None:
    assert page(client, world.reader, limit=10_000)["has_more"] is False


def test_another_tenants_event_is_a_404_like_an_unknown_one(
    client: TestClient, world: World
) -> None:
    assert post_events(client, world.writer, event("g-1", tenant="globex")).status_code == 200
    theirs = client.get("/v1/events/vm/g-1", headers=auth(world.acme_reader))
    unknown = client.get("/v1/events/vm/never-sent", headers=auth(world.acme_reader))

    answers = [assert_problem(r, 404, "ERR-RES-404") for r in (theirs, unknown)]
    for answer in answers:
        del answer["request_id"]
    assert answers[0] == answers[1]
    assert theirs.headers.keys() == unknown.headers.keys()
    assert client.get("/v1/events/vm/g-1", headers=auth(world.reader)).status_code == 200


# --- cursor integrity -----------------------------------------------------------------------


def flip(cursor: str, at_index: int) -> str:
    char = cursor[at_index]
    return cursor[:at_index] + ("B" if char != "B" else "C") + cursor[at_index + 1 :]


@pytest.fixture
def cursor(client: TestClient, world: World) -> str:
    batch = {"events": [event(f"c-{i}") for i in range(5)]}
    assert post_events(client, world.writer, batch).json()["accepted"] == 5
    body = page(client, world.reader, limit=2)
    assert body["has_more"] is True
    return str(body["next_cursor"])


def test_altered_cursor_is_a_400_naming_cursor(
    client: TestClient, world: World, cursor: str
) -> None:
    for index in (0, len(cursor) // 2, len(cursor) - 2):
        altered = flip(cursor, index)
        response = client.get(
            "/v1/events", params={"limit": 2, "cursor": altered}, headers=auth(world.reader)
        )
        problem = assert_problem(response, 400, "ERR-VAL-400")
        assert parameters(problem) == ["cursor"], index


@pytest.mark.parametrize("garbage", ["x", "!!!!", "AAAA", "a" * 2048, "a" * 2049])
def test_cursor_that_tally_never_issued_is_a_400(
    client: TestClient, world: World, garbage: str
) -> None:
    response = client.get("/v1/events", params={"cursor": garbage}, headers=auth(world.reader))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert parameters(problem) == ["cursor"]


def test_an_empty_cursor_is_a_400_naming_cursor_not_a_restart(
    client: TestClient, world: World, services: Services, cursor: str
) -> None:
    response = client.get("/v1/events?cursor=&limit=2", headers=auth(world.reader))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert parameters(problem) == ["cursor"]
    # The service refuses it too, for every caller that is not the HTTP route.
    reader = services.authenticator.authenticate(f"Bearer {world.reader}")
    with pytest.raises(InvalidInput, match="empty"):
        services.export.page(reader, ExportFilter(), cursor="", limit=2)


def test_every_character_of_a_cursor_is_sealed(
    client: TestClient, world: World, cursor: str
) -> None:
    for index in range(len(cursor)):
        # A changed character, or a stray one that a lenient base64 decoder would drop.
        variants = {flip(cursor, index)}
        if index % 16 == 0:
            variants |= {cursor[:index] + stray + cursor[index:] for stray in (".", "....")}
        for altered in variants - {cursor}:
            response = client.get(
                "/v1/events", params={"limit": 2, "cursor": altered}, headers=auth(world.reader)
            )
            problem = assert_problem(response, 400, "ERR-VAL-400")
            assert parameters(problem) == ["cursor"], (index, altered)


def test_a_cursor_reveals_nothing_of_its_positions(client: TestClient, world: World) -> None:
    # 200 events of one tenant: its partition's offset grows past one varint byte (127).
    batch = {"events": [event(f"p-{i}") for i in range(200)]}
    assert post_events(client, world.writer, batch).json()["accepted"] == 200
    first = page(client, world.reader, limit=1)["next_cursor"]
    again = page(client, world.reader, limit=1)["next_cursor"]
    far = page(client, world.reader, limit=150)["next_cursor"]

    assert first != again  # the same positions, sealed twice, share no bytes by design
    assert len({len(first), len(again), len(far)}) == 1  # nor does the length tell an offset
    rest = [page(client, world.reader, limit=1000, cursor=c)["events"] for c in (first, again)]
    assert rest[0] == rest[1] and len(rest[0]) == 199


def v1_cursor(secret: bytes, positions: list[int], start: int, digest: bytes) -> str:
    """A cursor as Tally issued them before they were sealed (version 1): the filter digest
    and varint positions in the clear, signed with HMAC-SHA256 under the store's secret."""
    varints = bytearray()
    for value in [*positions, start]:
        rest = value
        while True:
            low, rest = rest & 0x7F, rest >> 7
            varints.append(low | (0x80 if rest else 0))
            if not rest:
                break
    payload = bytes([1]) + digest + bytes(varints)
    mac = hmac.new(secret, payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()


def test_a_signed_version_1_cursor_is_still_accepted_and_answered_with_a_current_one(
    client: TestClient, world: World, services: Services
) -> None:
    batch = {"events": [event(f"c-{i}") for i in range(5)]}
    assert post_events(client, world.writer, batch).json()["accepted"] == 5
    seen = page(client, world.reader, limit=2)["events"]
    partitions = services.store.partitions
    positions = [0] * partitions
    positions[partition_of("acme", partitions)] = 2  # just after the two events seen
    saved = v1_cursor(services.store.secret("cursor"), positions, 0, ExportFilter().digest())

    rest = page(client, world.reader, limit=100, cursor=saved)

    assert sorted(e["id"] for e in seen + rest["events"]) == [f"c-{i}" for i in range(5)]
    issued = base64.urlsafe_b64decode(rest["next_cursor"] + "==")
    assert issued[0] == 3  # sealed, with the epoch
    assert page(client, world.reader, cursor=rest["next_cursor"])["events"] == []
    tampered = flip(saved, len(saved) // 2)
    refused = client.get("/v1/events", params={"cursor": tampered}, headers=auth(world.reader))
    assert parameters(assert_problem(refused, 400, "ERR-VAL-400")) == ["cursor"]


def test_cursor_reused_with_other_filters_is_a_400(
    client: TestClient, world: World, cursor: str
) -> None:
    for other in ({"tenant": "acme"}, {"type": "compute.vcpu_seconds"}, {"subject": "x"}):
        response = client.get(
            "/v1/events", params={"limit": 2, "cursor": cursor, **other}, headers=auth(world.reader)
        )
        assert parameters(assert_problem(response, 400, "ERR-VAL-400")) == ["cursor"]


def test_cursor_of_an_unrestricted_key_is_refused_for_a_restricted_one(
    client: TestClient, world: World, cursor: str
) -> None:
    response = client.get(
        "/v1/events", params={"limit": 2, "cursor": cursor}, headers=auth(world.acme_reader)
    )
    assert parameters(assert_problem(response, 400, "ERR-VAL-400")) == ["cursor"]


def test_cursor_may_be_used_with_another_limit(
    client: TestClient, world: World, cursor: str
) -> None:
    rest = page(client, world.reader, limit=100, cursor=cursor)
    assert len(rest["events"]) == 3
    assert rest["has_more"] is False


def test_cursor_survives_a_restart_on_the_same_store(
    client: TestClient, world: World, database_url: str, settings: Settings
) -> None:
    batch = {"events": [event(f"c-{i}") for i in range(5)]}
    assert post_events(client, world.writer, batch).json()["accepted"] == 5
    first = page(client, world.reader, limit=2)
    reopened = open_store(database_url)
    restarted = build(settings, store=reopened)
    try:
        with TestClient(create_app(services=restarted)) as other:
            rest = page(other, world.reader, limit=100, cursor=first["next_cursor"])
    finally:
        restarted.close()
    ids = [e["id"] for e in first["events"] + rest["events"]]
    assert sorted(ids) == [f"c-{i}" for i in range(5)]


def test_a_misspelt_filter_is_refused_not_ignored(client: TestClient, world: World) -> None:
    assert post_events(client, world.writer, event("a")).status_code == 200
    response = client.get("/v1/events", params={"tenat": "globex"}, headers=auth(world.reader))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert problem["errors"] == [
        {"parameter": "tenat", "detail": "is not a parameter of this route"}
    ]
    audit = client.get("/v1/audit", params={"acton": "x"}, headers=auth(world.admin))
    assert_problem(audit, 400, "ERR-VAL-400")
