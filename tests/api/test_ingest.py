"""POST /v1/events: single events, batches and CloudEvents, and what each one stores."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.auth.service import Scope
from tally.bootstrap import Services, build
from tally.events.model import StoredEvent
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.settings import Settings
from tally.store.interface import EventStore
from tally.store.sqlite import SQLiteStore
from tests.api.helpers import (
    CLOUDEVENT,
    CLOUDEVENT_BATCH,
    Clock,
    assert_problem,
    at,
    auth,
    cloudevent,
    export_all,
    pointers,
    post_events,
)
from tests.conftest import World, event


def stored(
    client: TestClient, world: World, event_id: str, application: str = "vm"
) -> httpx.Response:
    """GET /v1/events/{application}/{id} with the unrestricted reader."""
    response: httpx.Response = client.get(
        f"/v1/events/{application}/{event_id}", headers=auth(world.reader)
    )
    return response


# --- single events --------------------------------------------------------------------------


def test_single_event_is_accepted_with_its_id(client: TestClient, world: World) -> None:
    response = post_events(client, world.writer, event("e-1"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"id": "e-1", "status": "accepted"}
    got = stored(client, world, "e-1")
    assert got.status_code == 200
    body = got.json()
    assert body["id"] == "e-1"
    assert body["application"] == "vm"
    assert body["tenant"] == "acme"
    assert body["quantity"] == "1"
    assert body["region"] == "eu-west"
    assert body["received_at"].endswith("Z")


def test_repeating_a_single_event_answers_duplicate_and_stores_it_once(
    client: TestClient, world: World
) -> None:
    sent = event("e-1", subject="user-7", unit="s", attributes={"sku": "a1", "n": 2, "ok": True})
    assert post_events(client, world.writer, sent).json()["status"] == "accepted"
    again = post_events(client, world.writer, sent)
    assert again.status_code == 200
    assert again.json() == {"id": "e-1", "status": "duplicate"}
    assert len(export_all(client, world.reader)) == 1


def test_same_id_with_other_content_is_a_409_conflict_and_keeps_the_first(
    client: TestClient, world: World
) -> None:
    first = event("e-1", quantity="1")
    assert post_events(client, world.writer, first).status_code == 200
    response = post_events(client, world.writer, {**first, "quantity": "2"})
    problem = assert_problem(response, 409, "ERR-VAL-409")
    assert problem["type"] == "/problems/conflict"
    assert problem["title"] == "Conflict"
    assert problem["detail"] == "This id already holds other content; see errors."
    assert pointers(problem) == ["/id"]
    assert stored(client, world, "e-1").json()["quantity"] == "1"


def test_invalid_single_event_is_a_400_problem_pointing_at_the_field(
    client: TestClient, world: World
) -> None:
    response = post_events(client, world.writer, event("e-1", time="yesterday"))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert problem["type"] == "/problems/invalid-input"
    assert pointers(problem) == ["/time"]
    assert stored(client, world, "e-1").status_code == 404


def test_key_restricted_to_acme_cannot_report_for_globex(client: TestClient, world: World) -> None:
    response = post_events(client, world.acme_writer, event("e-1", tenant="globex"))
    assert_problem(response, 403, "ERR-AUTH-403")
    assert stored(client, world, "e-1").status_code == 404
    assert post_events(client, world.acme_writer, event("e-2")).status_code == 200


def test_unknown_tenant_is_a_400_pointing_at_tenant(client: TestClient, world: World) -> None:
    response = post_events(client, world.writer, event("e-1", tenant="initech"))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert pointers(problem) == ["/tenant"]
    assert export_all(client, world.reader) == []


# --- batches --------------------------------------------------------------------------------


def test_batch_reports_each_outcome_and_stores_valid_events_beside_rejected_ones(
    client: TestClient, world: World
) -> None:
    first = event("b-0")
    assert post_events(client, world.writer, first).status_code == 200
    batch = {
        "events": [
            first,  # a duplicate of the stored one
            event("b-1"),
            event("b-2", time="2026-01-01T00:00:00"),  # naive
            event("b-3", quantity="-1"),
            event("b-4"),
            event("b-5", tenant="initech"),
        ]
    }
    response = post_events(client, world.writer, batch)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 1, 3)
    outcomes = body["events"]
    assert [o["index"] for o in outcomes] == list(range(6))
    assert [o["id"] for o in outcomes] == [f"b-{i}" for i in range(6)]
    assert [o["status"] for o in outcomes] == [
        "duplicate",
        "accepted",
        "rejected",
        "rejected",
        "accepted",
        "rejected",
    ]
    assert "errors" not in outcomes[1]
    assert pointers(outcomes[2]) == ["/events/2/time"]
    assert pointers(outcomes[3]) == ["/events/3/quantity"]
    assert pointers(outcomes[5]) == ["/events/5/tenant"]
    assert all(error["detail"] for o in outcomes for error in o.get("errors", []))
    for event_id, status in [("b-1", 200), ("b-4", 200), ("b-2", 404), ("b-3", 404), ("b-5", 404)]:
        assert stored(client, world, event_id).status_code == status, event_id


def test_batch_reports_a_forbidden_tenant_per_event_without_failing_the_batch(
    client: TestClient, world: World
) -> None:
    batch = {"events": [event("b-0", tenant="globex"), event("b-1")]}
    response = post_events(client, world.acme_writer, batch)
    assert response.status_code == 200
    outcomes = response.json()["events"]
    assert [o["status"] for o in outcomes] == ["rejected", "accepted"]
    assert pointers(outcomes[0]) == ["/events/0/tenant"]
    assert stored(client, world, "b-0").status_code == 404


def test_batch_rejected_event_without_usable_id_reports_null_id(
    client: TestClient, world: World
) -> None:
    batch = {"events": [{"tenant": "acme"}, "not an object", event("b-2", id=7)]}
    body = post_events(client, world.writer, batch).json()
    assert [o["id"] for o in body["events"]] == [None, None, None]
    assert "/events/0/id" in pointers(body["events"][0])
    assert pointers(body["events"][1]) == ["/events/1"]
    assert pointers(body["events"][2]) == ["/events/2/id"]
    assert body["rejected"] == 3


def test_same_event_twice_in_one_batch_is_accepted_once_then_duplicate(
    client: TestClient, world: World
) -> None:
    sent = event("b-1")
    body = post_events(client, world.writer, {"events": [sent, sent]}).json()
    assert [o["status"] for o in body["events"]] == ["accepted", "duplicate"]
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (1, 1, 0)
    assert len(export_all(client, world.reader)) == 1


def test_same_id_with_other_content_in_one_batch_rejects_the_second_as_conflict(
    client: TestClient, world: World
) -> None:
    batch = {"events": [event("b-1", quantity="1"), event("b-1", quantity="5")]}
    body = post_events(client, world.writer, batch).json()
    assert [o["status"] for o in body["events"]] == ["accepted", "rejected"]
    assert pointers(body["events"][1]) == ["/events/1/id"]
    exported = export_all(client, world.reader)
    assert [e["quantity"] for e in exported] == ["1"]


def test_retrying_a_whole_batch_gives_duplicates_and_stores_nothing_twice(
    client: TestClient, world: World
) -> None:
    batch = {"events": [event(f"r-{i}") for i in range(20)] + [event("bad", quantity="x")]}
    first = post_events(client, world.writer, batch).json()
    assert (first["accepted"], first["duplicates"], first["rejected"]) == (20, 0, 1)
    count = len(export_all(client, world.reader))
    assert count == 20
    retry = post_events(client, world.writer, batch).json()
    assert (retry["accepted"], retry["duplicates"], retry["rejected"]) == (0, 20, 1)
    assert [o["status"] for o in retry["events"][:20]] == ["duplicate"] * 20
    assert len(export_all(client, world.reader)) == count


def test_events_of_one_id_in_two_applications_are_two_events(
    client: TestClient, world: World
) -> None:
    admin = auth(world.admin)
    assert client.post("/v1/applications", json={"id": "db"}, headers=admin).status_code == 201
    created = client.post(
        "/v1/keys", json={"scopes": ["events:write"], "application": "db"}, headers=admin
    )
    db_writer = created.json()["key"]
    assert post_events(client, world.writer, event("same")).json()["status"] == "accepted"
    assert post_events(client, db_writer, event("same", quantity="9")).json()["status"] == (
        "accepted"
    )
    assert stored(client, world, "same", "db").json()["quantity"] == "9"
    assert stored(client, world, "same", "vm").json()["quantity"] == "1"


# --- CloudEvents ----------------------------------------------------------------------------


def test_single_cloudevent_is_accepted_and_mapped_to_an_event(
    client: TestClient, world: World
) -> None:
    sent = cloudevent("ce-1", unit="s", attributes={"zone": "a"})
    sent["subject"] = "vm-42"
    sent["ext"] = "ignored"
    response = post_events(client, world.writer, sent, CLOUDEVENT)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": "ce-1", "status": "accepted"}
    got = stored(client, world, "ce-1").json()
    assert (got["tenant"], got["quantity"], got["unit"], got["subject"]) == (
        "acme",
        "2",
        "s",
        "vm-42",
    )
    assert got["attributes"] == {"zone": "a"}
    assert got["type"] == "compute.vcpu_seconds"
    again = post_events(client, world.writer, sent, CLOUDEVENT)
    assert again.json() == {"id": "ce-1", "status": "duplicate"}


def test_cloudevent_batch_array_reports_per_event_with_array_pointers(
    client: TestClient, world: World
) -> None:
    batch = [cloudevent("ce-0"), cloudevent("ce-1", quantity="-3"), cloudevent("ce-2")]
    response = post_events(client, world.writer, batch, CLOUDEVENT_BATCH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 0, 1)
    assert pointers(body["events"][1]) == ["/1/data/quantity"]
    assert stored(client, world, "ce-0").status_code == 200
    assert stored(client, world, "ce-1").status_code == 404
    assert stored(client, world, "ce-2").status_code == 200


def test_cloudevent_with_invalid_data_points_into_data(client: TestClient, world: World) -> None:
    response = post_events(client, world.writer, cloudevent("ce-1", quantity="x"), CLOUDEVENT)
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert pointers(problem) == ["/data/quantity"]


def test_cloudevent_without_specversion_or_source_is_rejected(
    client: TestClient, world: World
) -> None:
    sent = cloudevent("ce-1")
    del sent["specversion"], sent["source"]
    problem = assert_problem(
        post_events(client, world.writer, sent, CLOUDEVENT), 400, "ERR-VAL-400"
    )
    assert sorted(pointers(problem)) == ["/source", "/specversion"]
    batch = [cloudevent("ce-0"), {k: v for k, v in cloudevent("ce-1").items() if k != "source"}]
    body = post_events(client, world.writer, batch, CLOUDEVENT_BATCH).json()
    assert pointers(body["events"][1]) == ["/1/source"]
    assert stored(client, world, "ce-1").status_code == 404


def test_cloudevent_with_another_specversion_is_rejected(client: TestClient, world: World) -> None:
    sent = {**cloudevent("ce-1"), "specversion": "0.3"}
    problem = assert_problem(
        post_events(client, world.writer, sent, CLOUDEVENT), 400, "ERR-VAL-400"
    )
    assert pointers(problem) == ["/specversion"]


def test_cloudevent_and_native_event_with_same_content_are_duplicates(
    client: TestClient, world: World
) -> None:
    time = at(timedelta(minutes=-1))
    native = event("x-1", quantity="2", time=time)
    assert post_events(client, world.writer, native).json()["status"] == "accepted"
    sent = {**cloudevent("x-1"), "time": time}
    response = post_events(client, world.writer, sent, CLOUDEVENT)
    assert response.json() == {"id": "x-1", "status": "duplicate"}


def test_cloudevent_batch_must_be_an_array(client: TestClient, world: World) -> None:
    response = post_events(client, world.writer, cloudevent("ce-1"), CLOUDEVENT_BATCH)
    assert_problem(response, 400, "ERR-VAL-400")
    assert stored(client, world, "ce-1").status_code == 404


# --- retries judged by identity before time and shred ----------------------------------------


@dataclass
class Timed:
    client: TestClient
    services: Services
    clock: Clock

    def post(self, key: str, body: object) -> httpx.Response:
        return post_events(self.client, key, body)


@pytest.fixture
def timed(settings: Settings, store: EventStore, world: World) -> Iterator[Timed]:
    """An app on the test store whose clock the test sets (world's keys work in it)."""
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    built = build(settings, store=store, clock=clock)
    try:
        with TestClient(create_app(services=built), raise_server_exceptions=False) as client:
            yield Timed(client, built, clock)
    finally:
        built.committer.close()


def stamp(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def globex(event_id: str, time: datetime, **fields: object) -> dict[str, object]:
    """An event for tenant globex, whose lateness window is 24 hours."""
    return event(event_id, tenant="globex", time=stamp(time), **fields)


def status_of(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["status"]


def test_a_retry_after_its_lateness_window_has_passed_is_a_duplicate(
    timed: Timed, world: World
) -> None:
    edge = timed.clock.now - timedelta(hours=24) + timedelta(seconds=1)
    sent = globex("edge", edge, attributes={"sku": "a"})
    assert status_of(timed.post(world.writer, sent)) == "accepted"
    timed.clock.now += timedelta(seconds=5)

    assert status_of(timed.post(world.writer, sent)) == "duplicate"
    batch = timed.post(world.writer, {"events": [sent, globex("new-late", edge)]}).json()
    assert [e["status"] for e in batch["events"]] == ["duplicate", "rejected"]
    assert "errors" not in batch["events"][0]
    assert (batch["duplicates"], batch["rejected"]) == (1, 1)
    assert "lateness window" in batch["events"][1]["errors"][0]["detail"]


def test_a_retry_whose_time_is_now_too_far_ahead_is_a_duplicate(timed: Timed, world: World) -> None:
    ahead = globex("ahead", timed.clock.now + timedelta(minutes=4))
    assert status_of(timed.post(world.writer, ahead)) == "accepted"
    timed.clock.now -= timedelta(minutes=2)  # a clock stepped back by NTP
    assert status_of(timed.post(world.writer, ahead)) == "duplicate"


def test_other_content_for_a_stored_id_outside_the_window_is_still_a_conflict(
    timed: Timed, world: World
) -> None:
    edge = timed.clock.now - timedelta(hours=24) + timedelta(seconds=1)
    assert status_of(timed.post(world.writer, globex("edge", edge, quantity="2"))) == "accepted"
    timed.clock.now += timedelta(seconds=5)

    for changed in ({"quantity": "3"}, {"attributes": {"sku": "b"}}):
        response = timed.post(world.writer, globex("edge", edge, **changed))
        assert response.status_code == 409, response.text
        assert pointers(response.json()) == ["/id"]
    batch = timed.post(world.writer, {"events": [globex("edge", edge, quantity="3")]}).json()
    assert batch["events"][0]["status"] == "rejected"
    assert pointers(batch["events"][0]) == ["/events/0/id"]
    assert stored(timed.client, world, "edge").json()["quantity"] == "2"


def test_a_retry_after_its_tenant_was_shredded_is_a_duplicate_judged_by_its_clear_fields(
    timed: Timed, world: World
) -> None:
    sent = event("kept", subject="vm-1", unit="s", quantity="1.5", attributes={"sku": "a"})
    assert status_of(timed.post(world.writer, sent)) == "accepted"
    timed.services.registry.shred_tenant("acme")

    assert status_of(timed.post(world.writer, sent)) == "duplicate"
    # The attributes were digested under the destroyed key: they can no longer be compared.
    assert status_of(timed.post(world.writer, {**sent, "attributes": {"sku": "z"}})) == "duplicate"
    for changed in ({"quantity": "2"}, {"subject": "vm-2"}, {"unit": "ms"}, {"type": "x.y"}):
        response = timed.post(world.writer, {**sent, **changed})
        assert response.status_code == 409, (changed, response.text)
    refused = assert_problem(timed.post(world.writer, event("fresh")), 400, "ERR-VAL-400")
    assert "shredded" in refused["errors"][0]["detail"]


def test_retries_of_a_shredded_tenant_in_one_batch_are_judged_each(
    timed: Timed, world: World
) -> None:
    first = event("s-1", quantity="1")
    assert timed.post(world.writer, {"events": [first, event("s-2")]}).json()["accepted"] == 2
    timed.services.registry.shred_tenant("acme")
    body = {"events": [first, event("s-2", quantity="9"), event("s-3")]}
    batch = timed.post(world.writer, body).json()
    assert [e["status"] for e in batch["events"]] == ["duplicate", "rejected", "rejected"]
    assert pointers(batch["events"][1]) == ["/events/1/id"]
    assert pointers(batch["events"][2]) == ["/events/2/tenant"]


class CountingStore(SQLiteStore):
    """A real SQLite store that records each identity lookup of the ingest path."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lookups: list[int] = []

    def find_events(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[StoredEvent, bytes]]:
        self.lookups.append(len(keys))
        return super().find_events(keys)


def test_identities_are_looked_up_once_per_batch_and_only_for_refused_events(
    tmp_path: Path, keyring_file: Path
) -> None:
    store = CountingStore(tmp_path / "tally.db")
    store.migrate()
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    settings = Settings(database_url=f"sqlite:///{store.path}", keyring=str(keyring_file))
    built = build(settings, store=store, clock=clock)
    try:
        built.registry.create_tenant(TenantIn(id="globex", lateness_hours=24))
        built.registry.create_application(ApplicationIn(id="vm"))
        key = built.registry.create_key(KeyIn(scopes=[Scope.EVENTS_WRITE], application="vm")).key
        with TestClient(create_app(services=built)) as client:
            edge = clock.now - timedelta(hours=24) + timedelta(seconds=1)
            batch = {"events": [globex(f"b-{i}", edge) for i in range(50)]}
            assert post_events(client, key, batch).json()["accepted"] == 50
            assert post_events(client, key, batch).json()["duplicates"] == 50
            assert store.lookups == []  # in the window: the append alone judges identity

            clock.now += timedelta(seconds=5)
            late = {"events": [*batch["events"], globex("new", edge), globex("ok", clock.now)]}
            body = post_events(client, key, late).json()
            assert (body["duplicates"], body["rejected"], body["accepted"]) == (50, 1, 1)
            assert store.lookups == [51]  # one query for the batch's refused events
    finally:
        built.close()
