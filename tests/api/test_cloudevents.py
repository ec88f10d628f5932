"""CloudEvents as the official Python SDK (`cloudevents` on PyPI) sends them: structured, batch
and binary mode, unchanged, and binary-mode errors that name the header."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from cloudevents.core.bindings.http import HTTPMessage, to_binary_event, to_structured_event
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1 import conversion as legacy
from cloudevents.v1.http import CloudEvent as LegacyCloudEvent
from fastapi.testclient import TestClient

from tally.events.validation import validate_cloudevent
from tests.api.helpers import (
    CLOUDEVENT,
    assert_problem,
    auth,
    cloudevent,
    parameters,
    pointers,
    post_events,
)
from tests.conftest import World

JSON_UTF8 = "application/json; charset=utf-8"


def _time() -> datetime:
    # Microseconds in the past, in UTC: the SDK writes `...+00:00` as `Z`.
    return datetime.now(UTC) - timedelta(seconds=5)


def sdk_event(event_id: str, **attributes: Any) -> CloudEvent:
    """A usage CloudEvent built with the SDK's current (core) API."""
    base: dict[str, Any] = {
        "id": event_id,
        "source": "/apps/vm",
        "type": "compute.vcpu_seconds",
        "time": _time(),
        "subject": "vm-ü1",
        "datacontenttype": JSON_UTF8,
    }
    base.update(attributes)
    data = {"tenant": "acme", "quantity": "2.50", "unit": "s", "attributes": {"zone": "a"}}
    return CloudEvent(attributes=base, data=data)


def send(client: TestClient | httpx.Client, key: str, message: HTTPMessage) -> httpx.Response:
    response: httpx.Response = client.post(
        "/v1/events", content=message.body, headers={**message.headers, **auth(key)}
    )
    return response


def exported(client: TestClient | httpx.Client, key: str, event_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/events/vm/{event_id}", headers=auth(key))
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def assert_mapped(got: dict[str, Any], event_id: str, subject: str = "vm-ü1") -> None:
    assert got["id"] == event_id
    assert (got["tenant"], got["type"], got["quantity"], got["unit"]) == (
        "acme",
        "compute.vcpu_seconds",
        "2.5",
        "s",
    )
    assert (got["subject"], got["attributes"]) == (subject, {"zone": "a"})


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_the_sdks_structured_and_binary_events_are_stored_as_sent(
    client: TestClient, world: World, mode: str
) -> None:
    sent = sdk_event(f"sdk-{mode}")
    message = to_structured_event(sent) if mode == "structured" else to_binary_event(sent)
    response = send(client, world.writer, message)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": f"sdk-{mode}", "status": "accepted"}
    got = exported(client, world.reader, f"sdk-{mode}")
    assert_mapped(got, f"sdk-{mode}")
    assert datetime.fromisoformat(got["time"]) == sent.get_time()


def test_a_binary_event_is_the_same_event_as_its_structured_form(
    client: TestClient, world: World
) -> None:
    sent = sdk_event("same")
    assert send(client, world.writer, to_structured_event(sent)).json()["status"] == "accepted"
    assert send(client, world.writer, to_binary_event(sent)).json() == {
        "id": "same",
        "status": "duplicate",
    }


def test_the_legacy_sdk_api_structured_and_binary_events_are_accepted(
    client: TestClient, world: World
) -> None:
    for mode, convert in (("structured", legacy.to_structured), ("binary", legacy.to_binary)):
        event = LegacyCloudEvent(
            {
                "id": f"legacy-{mode}",
                "source": "/apps/vm",
                "type": "compute.vcpu_seconds",
                "time": _time().isoformat(),
                # ASCII: the legacy API writes headers without the binding's percent-encoding.
                "subject": "vm-1",
            },
            {"tenant": "acme", "quantity": "2.50", "unit": "s", "attributes": {"zone": "a"}},
        )
        headers, body = convert(event)
        response = client.post(
            "/v1/events", content=body, headers={**headers, **auth(world.writer)}
        )
        assert response.status_code == 200, (mode, response.text)
        got = exported(client, world.reader, f"legacy-{mode}")
        assert_mapped(got, f"legacy-{mode}", subject="vm-1")


def test_a_batch_of_the_sdks_events_is_accepted_as_a_cloudevents_batch(
    client: TestClient, world: World
) -> None:
    # The SDK has no batch format of its own: a JSON array of its structured events is the
    # CloudEvents JSON batch format (application/cloudevents-batch+json).
    format_ = JSONFormat()
    events = [sdk_event(f"batch-{n}") for n in range(3)]
    body = b"[" + b",".join(format_.write(event) for event in events) + b"]"
    response = client.post(
        "/v1/events",
        content=body,
        headers={"Content-Type": "application/cloudevents-batch+json", **auth(world.writer)},
    )
    assert response.status_code == 200, response.text
    assert (response.json()["accepted"], response.json()["rejected"]) == (3, 0)
    for n in range(3):
        assert_mapped(exported(client, world.reader, f"batch-{n}"), f"batch-{n}")


def binary(event_id: str, **headers: str) -> dict[str, str]:
    base = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/apps/vm",
        "ce-type": "compute.vcpu_seconds",
        "ce-time": _time().isoformat(),
        "Content-Type": "application/json",
    }
    base.update(headers)
    return {k: v for k, v in base.items() if v != ""}


def post_binary(
    client: TestClient, key: str, headers: dict[str, str], data: object | None = None
) -> httpx.Response:
    payload = {"tenant": "acme", "quantity": "1"} if data is None else data
    response: httpx.Response = client.post(
        "/v1/events", content=json.dumps(payload), headers={**headers, **auth(key)}
    )
    return response


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"ce-time": "yesterday"}, "ce-time"),
        ({"ce-time": "2026-01-01T00:00:00"}, "ce-time"),
        ({"ce-id": "has space"}, "ce-id"),
        ({"ce-type": "Compute"}, "ce-type"),
        ({"ce-source": ""}, "ce-source"),
        ({"ce-subject": "%00"}, "ce-subject"),
        ({"ce-specversion": "0.3"}, "ce-specversion"),
        ({"ce-time": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}, "ce-time"),
    ],
)
def test_a_binary_event_with_a_bad_header_is_refused_naming_the_header(
    client: TestClient, world: World, headers: dict[str, str], named: str
) -> None:
    response = post_binary(client, world.writer, binary("bad", **headers))
    problem = assert_problem(response, 400, "ERR-VAL-400")
    assert parameters(problem) == [named], problem
    assert client.get("/v1/events/vm/bad", headers=auth(world.reader)).status_code == 404


@pytest.mark.parametrize(
    ("data", "pointer"),
    [
        ({"tenant": "acme", "quantity": "-1"}, "/quantity"),
        ({"tenant": "nobody", "quantity": "1"}, "/tenant"),
        ({"tenant": "acme", "quantity": "1", "extra": 1}, "/extra"),
        ({"tenant": "acme", "quantity": "1", "attributes": {"a": [1]}}, "/attributes/a"),
        ([1], ""),
    ],
)
def test_a_binary_event_with_bad_data_points_into_the_body(
    client: TestClient, world: World, data: object, pointer: str
) -> None:
    problem = assert_problem(
        post_binary(client, world.writer, binary("bad"), data), 400, "ERR-VAL-400"
    )
    assert pointers(problem) == [pointer]


def test_a_binary_event_header_sent_twice_or_not_percent_encoded_utf8_is_refused(
    client: TestClient, world: World
) -> None:
    headers = [(k, v) for k, v in binary("twice").items()] + [("ce-id", "again")]
    twice = client.post(
        "/v1/events",
        content=b'{"tenant":"acme","quantity":"1"}',
        headers=[*headers, *auth(world.writer).items()],
    )
    assert parameters(assert_problem(twice, 400, "ERR-VAL-400")) == ["ce-id"]
    broken = post_binary(client, world.writer, binary("broken", **{"ce-subject": "%ff"}))
    assert parameters(assert_problem(broken, 400, "ERR-VAL-400")) == ["ce-subject"]


def test_a_binary_events_percent_encoded_subject_is_decoded_as_utf8(
    client: TestClient, world: World
) -> None:
    headers = binary("decoded", **{"ce-subject": "vm%20%C3%BC", "ce-traceparent": "00-ab-cd-01"})
    assert post_binary(client, world.writer, headers).json()["status"] == "accepted"
    assert exported(client, world.reader, "decoded")["subject"] == "vm ü"


@pytest.mark.parametrize(
    "content_type",
    ["application/cloudevents+json", "text/plain", "application/json; charset=latin-1"],
)
def test_a_binary_event_whose_data_is_not_utf8_json_is_a_415(
    client: TestClient, world: World, content_type: str
) -> None:
    response = post_binary(client, world.writer, binary("typed", **{"Content-Type": content_type}))
    assert_problem(response, 415, "ERR-VAL-400")


@pytest.mark.parametrize(
    "datacontenttype",
    [
        "application/json",
        JSON_UTF8,
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
    ],
)
def test_a_datacontenttype_with_parameters_is_accepted(
    client: TestClient, world: World, datacontenttype: str
) -> None:
    sent = {**cloudevent("typed"), "datacontenttype": datacontenttype}
    response = post_events(client, world.writer, sent, CLOUDEVENT)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "datacontenttype", ["text/plain", "application/xml", "application/json; charset=latin-1", ""]
)
def test_another_datacontenttype_is_refused_at_its_pointer(datacontenttype: str) -> None:
    errors = validate_cloudevent({**cloudevent("typed"), "datacontenttype": datacontenttype})
    assert isinstance(errors, list)
    assert [e.pointer for e in errors] == ["/datacontenttype"]


def test_a_structured_cloudevents_unknown_tenant_is_pointed_at_in_its_data(
    client: TestClient, world: World
) -> None:
    sent = cloudevent("nowhere", tenant="nobody")
    problem = assert_problem(
        post_events(client, world.writer, sent, CLOUDEVENT), 400, "ERR-VAL-400"
    )
    assert pointers(problem) == ["/data/tenant"]
    batch = post_events(client, world.writer, [sent], "application/cloudevents-batch+json")
    assert pointers(batch.json()["events"][0]) == ["/0/data/tenant"]


def test_the_quantity_of_a_binary_event_is_exact(client: TestClient, world: World) -> None:
    body = '{"tenant": "acme", "quantity": 12345678901234567890.123456789012345678}'
    response = client.post(
        "/v1/events", content=body, headers={**binary("exact"), **auth(world.writer)}
    )
    assert response.status_code == 200, response.text
    assert Decimal(exported(client, world.reader, "exact")["quantity"]) == Decimal(
        "12345678901234567890.123456789012345678"
    )


def test_the_binary_mode_headers_are_documented_on_post_events(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/events"]["post"]
    headers = {p["name"]: p for p in operation["parameters"] if p["in"] == "header"}
    assert set(headers) == {
        f"ce-{n}" for n in ("specversion", "id", "source", "type", "time", "subject")
    }
    assert not any(p["required"] for p in headers.values())
    assert headers["ce-time"]["schema"]["pattern"].startswith("^(\\d{4}-")
    assert headers["ce-specversion"]["schema"]["pattern"] == "^1\\.0$"
