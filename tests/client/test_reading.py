"""The SDK's reading half: the export resumed from any entry's cursor (a real server's JSON
pages; NDJSON, which the server does not stream yet, from an httpx.MockTransport standing in
for it), and the request each wrapper of the routes still being built sends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tally.client import Client, Event, TallyError, reconciliation_digest
from tests.client.conftest import Deployment, call


def report(client: Client, count: int) -> list[str]:
    event = Event(tenant="acme", type="storage.gib_hours", quantity=Decimal("2.5"))
    ids = [client.report(event) for _ in range(count)]
    assert client.flush().acknowledged == count
    return ids


def test_the_export_resumes_after_any_entry_of_json_pages(deployment: Deployment) -> None:
    url = deployment.server.base_url
    with Client(url, deployment.writer) as writer, Client(url, deployment.reader) as reader:
        ids = report(writer, 25)
        export = reader.export(tenant="acme", limit=10)
        pairs = list(export)
        assert [entry["id"] for entry, _ in pairs] == ids
        assert pairs[-1][0]["quantity"] == "2.5"
        for position in range(25):
            resumed = reader.export(cursor=pairs[position][1], tenant="acme", limit=10)
            assert [entry["id"] for entry, _ in resumed] == ids[position + 1 :], position
        # Polling with the cursor after the end brings exactly what came since.
        later = report(writer, 3)
        assert [entry["id"] for entry, _ in reader.export(export.cursor, tenant="acme")] == later


def test_a_changed_composite_cursor_is_refused(deployment: Deployment) -> None:
    with Client(deployment.server.base_url, deployment.reader) as reader:
        with pytest.raises(ValueError, match="cursor"):
            list(reader.export(cursor="sdk1~bm9wZQ"))
        with pytest.raises(TallyError) as refused:
            list(reader.export(cursor="not-a-cursor"))
    assert refused.value.status == 400
    assert refused.value.errors[0]["parameter"] == "cursor"


class CutStream(httpx.SyncByteStream):
    """Lines, then a broken connection."""

    def __init__(self, lines: list[bytes], cut: bool) -> None:
        self.lines, self.cut = lines, cut

    def __iter__(self) -> Iterator[bytes]:
        yield from self.lines
        if self.cut:
            raise httpx.ReadError("connection reset")


def test_an_ndjson_stream_cut_mid_way_resumes_from_its_last_line() -> None:
    entries = [{"kind": "event", "application": "vm", "id": f"e{n}"} for n in range(10)]
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        start = int(request.url.params.get("cursor", "c0")[1:])
        lines = [
            json.dumps(entry | {"cursor": f"c{n + 1}"}).encode() + b"\n"
            for n, entry in enumerate(entries)
            if n >= start
        ]
        first = len(requests) == 1
        if first:  # the first answer breaks after four lines and half of the fifth
            lines = [*lines[:4], lines[4][:7]]
        else:
            lines.append(json.dumps({"next_cursor": "c10", "has_more": False}).encode() + b"\n")
        headers = {"content-type": "application/x-ndjson"}
        return httpx.Response(200, headers=headers, stream=CutStream(lines, first))

    client = Client("http://tally.test", "tly_k", transport=httpx.MockTransport(answer))
    export = client.export(tenant="acme")
    got = list(export)
    client.close()
    assert [entry for entry, _ in got] == entries
    assert [cursor for _, cursor in got] == [f"c{n}" for n in range(1, 11)]
    assert export.cursor == "c10"
    assert requests[0].headers["accept"].startswith("application/x-ndjson")
    assert [r.url.params.get("cursor") for r in requests] == [None, "c4"]
    assert {r.url.params["tenant"] for r in requests} == {"acme"}


class Recorder:
    """Answers every request with `body` (or a 404 problem document), keeping the requests."""

    def __init__(self, body: Any = None, status: int = 200) -> None:
        self.requests: list[httpx.Request] = []
        self.body, self.status = body, status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.status == 404:
            problem = {"type": "/problems/not-found", "status": 404, "code": "ERR-RES-404"}
            return httpx.Response(404, json=problem)
        if self.body is None:
            return httpx.Response(self.status)
        return httpx.Response(self.status, json=self.body)

    def client(self) -> Client:
        return Client("http://tally.test/", "tly_k", transport=httpx.MockTransport(self))


def test_usage_sends_the_query_the_route_reads() -> None:
    recorder = Recorder({"rows": []})
    client = recorder.client()
    answer = client.usage(
        from_=datetime(2026, 3, 1, tzinfo=UTC),
        to="2026-04-01T00:00:00Z",
        window="day",
        tz="Europe/Paris",
        aggregation="unique_count",
        unique_of="attributes.user",
        group_by=["subject", "attributes.sku"],
        tenant="acme",
    )
    client.close()
    assert answer == {"rows": []}
    (request,) = recorder.requests
    assert (request.method, request.url.path) == ("GET", "/v1/usage")
    assert request.url.params.get_list("group_by") == ["subject", "attributes.sku"]
    assert dict(request.url.params) | {"group_by": None} == {
        "from": "2026-03-01T00:00:00.000000Z",
        "to": "2026-04-01T00:00:00Z",
        "window": "day",
        "tz": "Europe/Paris",
        "aggregation": "unique_count",
        "unique_of": "attributes.user",
        "group_by": None,
        "tenant": "acme",
    }
    assert request.headers["authorization"] == "Bearer tly_k"


def test_reconciliation_sends_the_query_the_route_reads() -> None:
    recorder = Recorder({"rows": []})
    client = recorder.client()
    client.reconciliation(tenant="acme", from_="2026-03-01", to="2026-03-02", period="hour")
    client.close()
    (request,) = recorder.requests
    assert request.url.path == "/v1/reconciliation"
    assert dict(request.url.params) == {
        "tenant": "acme",
        "from": "2026-03-01",
        "to": "2026-03-02",
        "period": "hour",
    }


def test_meters_send_each_route_its_request() -> None:
    recorder = Recorder({"id": "cpu"})
    client = recorder.client()
    client.meters.create(id="cpu", type="compute.vcpu_seconds", aggregation="sum", unit="s")
    client.meters.get("a/b")
    client.meters.usage("cpu", tenant="acme", from_="2026-03-01T00:00:00Z", window="day")
    client.close()
    create, get, usage = recorder.requests
    assert (create.method, create.url.path) == ("POST", "/v1/meters")
    assert json.loads(create.content) == {
        "id": "cpu",
        "type": "compute.vcpu_seconds",
        "aggregation": "sum",
        "unit": "s",
    }
    assert create.headers["content-type"] == "application/json"
    assert get.url.raw_path == b"/v1/meters/a%2Fb"
    assert usage.url.path == "/v1/meters/cpu/usage"
    assert dict(usage.url.params) == {
        "tenant": "acme",
        "from": "2026-03-01T00:00:00Z",
        "window": "day",
    }
    listing = Recorder({"meters": [{"id": "cpu"}]})
    client = listing.client()
    assert client.meters.list() == [{"id": "cpu"}]
    client.meters.delete("cpu")
    client.close()
    assert [(r.method, r.url.path) for r in listing.requests] == [
        ("GET", "/v1/meters"),
        ("DELETE", "/v1/meters/cpu"),
    ]


def test_a_refusal_raises_tally_error_with_the_problem_document() -> None:
    client = Recorder(status=404).client()
    with pytest.raises(TallyError) as missing:
        client.meters.get("nope")
    client.close()
    assert missing.value.status == 404
    assert missing.value.code == "ERR-RES-404"
    assert missing.value.problem["type"] == "/problems/not-found"


def test_reconciliation_digest_is_the_servers_own() -> None:
    digest = pytest.importorskip("tally.events.digest")
    entries = [
        {
            "kind": "event",
            "id": "e1",
            "application": "vm",
            "tenant": "acme",
            "type": "compute.vcpu_seconds",
            "quantity": "1.50",
            "time": "2026-03-01T00:00:00.000000Z",
            "subject": None,
            "unit": None,
            "attributes": {},
        }
    ]
    assert reconciliation_digest(entries) == digest.reconciliation_digest(entries)


def test_numeric_attributes_come_back_exactly_and_keep_their_digest(
    deployment: Deployment,
) -> None:
    # A float would read 12345678901234567890.5 as 1.2345678901234567e+19: the copy's digest
    # would then differ from Tally's for an event nobody changed.
    url = deployment.server.base_url
    exact = Decimal("12345678901234567890.5")
    with Client(url, deployment.writer) as writer, Client(url, deployment.reader) as reader:
        writer.report(Event(tenant="acme", type="t", quantity=1, attributes={"big": exact}))
        assert writer.flush().acknowledged == 1
        [(entry, _)] = list(reader.export(tenant="acme"))
    assert entry["attributes"] == {"big": exact}
    raw = httpx.get(
        f"{url}/v1/events?tenant=acme", headers={"Authorization": f"Bearer {deployment.reader}"}
    )
    [as_sent] = json.loads(raw.content, parse_float=Decimal)["events"]
    as_float = {**as_sent, "attributes": {"big": float(exact)}}
    assert reconciliation_digest([entry]) == reconciliation_digest([as_sent])
    assert reconciliation_digest([entry]) != reconciliation_digest([as_float])


def test_a_billing_system_proves_its_copy_with_the_sdk(deployment: Deployment) -> None:
    server = deployment.server
    made = call(server, "POST", "/v1/keys", server.admin_key, json={"scopes": ["usage:read"]})
    assert made.status_code == 201, made.text
    url, now = server.base_url, datetime.now(UTC)
    with (
        Client(url, deployment.writer) as writer,
        Client(url, deployment.reader) as reader,
        Client(url, made.json()["key"]) as billing,
    ):
        report(writer, 7)
        answer = billing.reconciliation(
            tenant="acme", from_=now - timedelta(days=1), to=now + timedelta(days=1), period="day"
        )
        rows = answer["rows"]
        assert sum(row["count"] for row in rows) == 7
        for row in rows:
            copy = [
                entry
                for entry, _ in reader.export(
                    tenant="acme",
                    type=row["type"],
                    time_from=row["period_start"],
                    time_to=row["period_end"],
                )
            ]
            assert reconciliation_digest(copy) == row["digest"]
            altered = [{**copy[0], "quantity": "2.51"}, *copy[1:]]
            assert reconciliation_digest(altered) != row["digest"]
