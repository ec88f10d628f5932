"""POST /v1/events/{application}/{id}/cancel and what a cancellation changes in the export."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.auth.service import Scope
from tally.bootstrap import Services, build
from tally.events.model import format_time
from tally.registry.models import ApplicationIn, KeyIn
from tally.settings import Settings
from tally.store.interface import EventStore
from tests.api.helpers import assert_problem, auth, export_all, pointers, post_events
from tests.api.test_audit import Clock
from tests.conftest import World, event


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def services(settings: Settings, store: EventStore, clock: Clock) -> Iterator[Services]:
    """The shared fixture's services, on a clock the test moves."""
    built = build(settings, store=store, clock=clock)
    yield built
    built.committer.close()


def cancel(client: TestClient, key: str, event_id: str, body: object, application: str = "vm"):  # type: ignore[no-untyped-def]
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(
        f"/v1/events/{application}/{event_id}/cancel",
        content=content,
        headers={**auth(key), "Content-Type": "application/json"},
    )


def sent(client: TestClient, world: World, event_id: str, **fields: Any) -> None:
    assert post_events(client, world.writer, event(event_id, **fields)).status_code == 200


def test_the_writer_cancels_its_event_once_and_the_export_shows_both_entries(
    client: TestClient, world: World, clock: Clock
) -> None:
    sent(client, world, "e-1")
    sent(client, world, "e-2")
    response = cancel(client, world.writer, "e-1", {"reason": "reported twice, ünïcode"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        "kind": "cancellation",
        "application": "vm",
        "id": "e-1",
        "tenant": "acme",
        "reason": "reported twice, ünïcode",
        "received_at": format_time(clock.now),
    }
    # Again with the same reason, later: the same cancellation, nothing appended.
    clock.now += timedelta(minutes=5)
    again = cancel(client, world.writer, "e-1", {"reason": "reported twice, ünïcode"})
    assert again.status_code == 200
    assert again.json() == body
    # Another reason: refused, naming the cancellation that stands.
    other = assert_problem(
        cancel(client, world.writer, "e-1", {"reason": "other"}), 409, "ERR-VAL-409"
    )
    assert other["type"] == "/problems/conflict"
    assert body["received_at"] in other["detail"]
    assert pointers(other) == ["/reason"]

    entries = export_all(client, world.reader)
    assert [(e["kind"], e["id"]) for e in entries] == [
        ("event", "e-1"),
        ("event", "e-2"),
        ("cancellation", "e-1"),
    ]
    assert entries[2] == body
    assert [e["id"] for e in export_all(client, world.reader, kind="event")] == ["e-1", "e-2"]
    assert export_all(client, world.reader, kind="cancellation") == [body]

    shown = client.get("/v1/events/vm/e-1", headers=auth(world.reader)).json()
    assert shown["cancelled"] == {"at": body["received_at"], "reason": body["reason"]}
    assert "cancelled" not in client.get("/v1/events/vm/e-2", headers=auth(world.reader)).json()


def test_an_admin_cancels_any_event_and_other_keys_cannot(
    client: TestClient, world: World, services: Services
) -> None:
    sent(client, world, "e-1")
    sent(client, world, "g-1", tenant="globex")
    services.registry.create_application(ApplicationIn(id="billing"))
    stranger = services.registry.create_key(
        KeyIn(scopes=[Scope.EVENTS_WRITE], application="billing")
    ).key

    # Another application's event is the same 404 as an unknown one.
    unknown = assert_problem(
        cancel(client, world.writer, "nope", {"reason": "x"}), 404, "ERR-RES-404"
    )
    theirs = assert_problem(cancel(client, stranger, "e-1", {"reason": "x"}), 404, "ERR-RES-404")
    assert theirs["detail"] == unknown["detail"]
    # A tenant-restricted writer: another tenant's event is not found either.
    assert_problem(cancel(client, world.acme_writer, "g-1", {"reason": "x"}), 404, "ERR-RES-404")
    # Scopes: reading is not cancelling; no key at all is 401 whatever the body.
    assert_problem(cancel(client, world.reader, "e-1", {"reason": "x"}), 403, "ERR-AUTH-403")
    anonymous = client.post("/v1/events/vm/e-1/cancel", content=b"{not json")
    assert_problem(anonymous, 401, "ERR-AUTH-401")
    assert export_all(client, world.reader, kind="cancellation") == []

    assert cancel(client, world.acme_writer, "e-1", {"reason": "x"}).status_code == 200
    admin = cancel(client, world.admin, "g-1", {"reason": "by an operator"})
    assert admin.status_code == 200
    assert admin.json()["tenant"] == "globex"


def test_a_cancellation_after_the_period_is_final_is_refused_and_stores_nothing(
    client: TestClient, world: World, clock: Clock
) -> None:
    # globex's lateness window is 24 hours: the event's periods are final at its time + 24h.
    time = clock.now - timedelta(hours=1)
    sent(client, world, "g-1", tenant="globex", time=format_time(time))
    clock.now = time + timedelta(hours=24)
    problem = assert_problem(
        cancel(client, world.writer, "g-1", {"reason": "too late"}), 409, "ERR-VAL-409"
    )
    assert problem["type"] == "/problems/period-final"
    assert problem["title"] == "Period final"
    assert format_time(time + timedelta(hours=24)) in problem["detail"]
    assert export_all(client, world.reader, kind="cancellation") == []
    # A microsecond earlier it was still open.
    clock.now -= timedelta(microseconds=1)
    assert cancel(client, world.writer, "g-1", {"reason": "in time"}).status_code == 200
    # And once final, the same reason still answers the stored cancellation (idempotent).
    clock.now += timedelta(days=30)
    assert cancel(client, world.writer, "g-1", {"reason": "in time"}).status_code == 200


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({}, "/reason"),
        ({"reason": ""}, "/reason"),
        ({"reason": "x" * 257}, "/reason"),
        ({"reason": 7}, "/reason"),
        ({"reason": "ok", "extra": 1}, "/extra"),
        ('{"reason": "a", "reason": "b"}', ""),
        ("[]", ""),
    ],
)
def test_a_bad_body_is_refused_with_its_pointer_and_stores_nothing(
    client: TestClient, world: World, body: object, pointer: str
) -> None:
    sent(client, world, "e-1")
    problem = assert_problem(cancel(client, world.writer, "e-1", body), 400, "ERR-VAL-400")
    assert pointer in pointers(problem) or (pointer == "" and problem["detail"])
    assert export_all(client, world.reader, kind="cancellation") == []


def test_a_body_that_is_not_json_is_415(client: TestClient, world: World) -> None:
    sent(client, world, "e-1")
    response = client.post(
        "/v1/events/vm/e-1/cancel",
        content="reason=x",
        headers={**auth(world.writer), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_problem(response, 415, "ERR-VAL-400")


def test_a_shredded_tenants_event_is_not_cancelled(
    client: TestClient, world: World, services: Services
) -> None:
    sent(client, world, "e-1")
    sent(client, world, "e-2")
    assert cancel(client, world.writer, "e-2", {"reason": "before shredding"}).status_code == 200
    services.registry.shred_tenant("acme")
    problem = assert_problem(
        cancel(client, world.writer, "e-1", {"reason": "x"}), 409, "ERR-VAL-409"
    )
    assert "shredded" in problem["detail"]
    # The cancellation made before stays, its reason unreadable like the attributes.
    (entry,) = export_all(client, world.reader, kind="cancellation")
    assert entry["reason"] is None and entry["shredded"] is True


def test_an_id_with_a_slash_or_ending_in_cancel_is_cancelled_by_its_whole_id(
    client: TestClient, world: World
) -> None:
    sent(client, world, "a/b")
    sent(client, world, "x/cancel")
    assert cancel(client, world.writer, "a%2Fb", {"reason": "r"}).json()["id"] == "a/b"
    assert cancel(client, world.writer, "x/cancel", {"reason": "r"}).json()["id"] == "x/cancel"
    assert {e["id"] for e in export_all(client, world.reader, kind="cancellation")} == {
        "a/b",
        "x/cancel",
    }
