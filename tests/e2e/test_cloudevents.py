"""The official CloudEvents SDK against a real `tally serve`: structured, batch and binary mode
over a socket, through uvicorn's own header handling."""

from __future__ import annotations

from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.formats.json import JSONFormat

from tests.api.test_cloudevents import assert_mapped, exported, sdk_event, send
from tests.support.server import Server


def test_the_sdks_events_in_every_mode_are_stored_by_a_real_server(tally_server: Server) -> None:
    admin = {"Authorization": f"Bearer {tally_server.admin_key}"}
    with tally_server.client(timeout=10) as client:
        assert client.post("/v1/tenants", json={"id": "acme"}, headers=admin).status_code == 201
        assert client.post("/v1/applications", json={"id": "vm"}, headers=admin).status_code == 201
        keys = {
            role: client.post("/v1/keys", json=spec, headers=admin).json()["key"]
            for role, spec in (
                ("writer", {"scopes": ["events:write"], "application": "vm"}),
                ("reader", {"scopes": ["events:read"]}),
            )
        }
        structured = send(client, keys["writer"], to_structured_event(sdk_event("e2e-s")))
        binary = send(client, keys["writer"], to_binary_event(sdk_event("e2e-b")))
        assert (structured.status_code, binary.status_code) == (200, 200), binary.text
        body = b"[" + b",".join(JSONFormat().write(sdk_event(f"e2e-{n}")) for n in range(2)) + b"]"
        batch = client.post(
            "/v1/events",
            content=body,
            headers={
                "Content-Type": "application/cloudevents-batch+json",
                "Authorization": f"Bearer {keys['writer']}",
            },
        )
        assert batch.json()["accepted"] == 2, batch.text
        for event_id in ("e2e-s", "e2e-b", "e2e-0", "e2e-1"):
            assert_mapped(exported(client, keys["reader"], event_id), event_id)
