"""POST /v1/events: single events, batches and CloudEvents, and what each one stores."""

from __future__ import annotations

from datetime import timedelta

import httpx
from fastapi.testclient import TestClient

from tests.api.helpers import (
    CLOUDEVENT,
    CLOUDEVENT_BATCH,
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
