"""Exactly once, end to end: concurrent writers and paging readers against a real server.

Writers send batches (native and CloudEvents) that mix new events, duplicates of events they
had accepted, conflicting reuses of ids, invalid events and ids contested by another writer;
some batches are retried verbatim. Meanwhile readers page GET /v1/events with and without
filters, following next_cursor and polling until the writers are done and a poll after that
brings nothing new. Then what each reader saw must be exactly what the server acknowledged as
accepted (and matches its filter): none missing, none twice, quantities exact.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, localcontext
from typing import Any

import httpx
import pytest

from tests.support.server import Server

TENANTS = ["acme", "globex", "initech"]
APPLICATIONS = ["vm", "storage"]
TYPES = ["compute.vcpu_seconds", "storage.gib_hours", "net.egress_bytes"]
WRITERS = 6
BATCHES_PER_WRITER = 20
HOT_IDS = 6  # ids every writer of an application sends with its own content
PAGE_LIMIT = 37
DEADLINE_SECONDS = 45.0
HTTP_TIMEOUT = 15.0

JSON = "application/json"
CLOUDEVENT = "application/cloudevents+json"
CLOUDEVENT_BATCH = "application/cloudevents-batch+json"

Key = tuple[str, str]  # (application, id)


# --- what was sent and what was acknowledged -------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One event as a writer sent it; `body` is the native JSON object."""

    application: str
    body: dict[str, Any]
    kind: str  # new | hot | duplicate | conflict | invalid | forbidden

    @property
    def key(self) -> Key:
        return (self.application, str(self.body["id"]))

    def cloudevent(self) -> dict[str, Any]:
        data = {
            k: self.body[k] for k in ("tenant", "quantity", "unit", "attributes") if k in self.body
        }
        ce = {
            "specversion": "1.0",
            "id": self.body["id"],
            "source": f"//tests/{self.application}",
            "type": self.body["type"],
            "time": self.body["time"],
            "data": data,
        }
        if "subject" in self.body:
            ce["subject"] = self.body["subject"]
        return ce


@dataclass
class Ledger:
    """Every acknowledgement the server gave, shared by the writer threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: dict[Key, dict[str, Any]] = field(default_factory=dict)
    accepted_twice: list[Key] = field(default_factory=list)
    hot_outcomes: dict[Key, list[str]] = field(default_factory=dict)
    requests: int = 0

    def settle(self, sent: Sent, status: str) -> None:
        with self.lock:
            if sent.kind == "hot":
                self.hot_outcomes.setdefault(sent.key, []).append(status)
            if status == "accepted":
                if sent.key in self.accepted:
                    self.accepted_twice.append(sent.key)
                self.accepted[sent.key] = sent.body


def event_time(rng: random.Random) -> str:
    """Within the last hour, with one of several explicit offsets."""
    moment = datetime.now(UTC) - timedelta(seconds=rng.randint(5, 3600))
    zone = rng.choice([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))])
    text = moment.astimezone(zone).isoformat(timespec=rng.choice(["seconds", "microseconds"]))
    return text.replace("+00:00", "Z") if rng.random() < 0.5 else text


def quantity(rng: random.Random) -> str | int | float:
    """Exact decimals as strings (up to 20 digits before the point and 18 after) or as
    JSON numbers whose literal is exact."""
    choice = rng.random()
    if choice < 0.2:
        return rng.choice([0.1, 0.2, 0.25, 1.5, 3, 0, 42])
    if choice < 0.3:
        return "99999999999999999999.999999999999999999"
    if choice < 0.4:
        return "0.000000000000000001"
    whole = rng.randint(0, 10 ** rng.randint(0, 12))
    fraction = rng.randint(0, 10**18 - 1)
    return f"{whole}.{fraction:018d}".rstrip("0").rstrip(".")


def valid_event(rng: random.Random, event_id: str, tenants: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": event_id,
        "tenant": rng.choice(tenants),
        "type": rng.choice(TYPES),
        "quantity": quantity(rng),
        "time": event_time(rng),
    }
    if rng.random() < 0.7:
        body["subject"] = f"vm-{rng.randint(1, 5)}"
    if rng.random() < 0.7:
        body["unit"] = rng.choice(["s", "GiB", "request"])
    if rng.random() < 0.7:
        body["attributes"] = {"zone": rng.choice(["eu-1a", "eu-1b"]), "spot": rng.random() < 0.5}
    return body


def invalid_event(rng: random.Random, event_id: str) -> dict[str, Any]:
    body = valid_event(rng, event_id, ["acme"])
    flaw = rng.randrange(6)
    if flaw == 0:
        body["quantity"] = "-1"
    elif flaw == 1:
        body["time"] = "2024-01-01T00:00:00"  # naive
    elif flaw == 2:
        body["tenant"] = "no-such-tenant"
    elif flaw == 3:
        body["type"] = "Not A Type"
    elif flaw == 4:
        body["quantity"] = "1.0000000000000000001"  # 19 decimals
    else:
        body["time"] = (datetime.now(UTC) - timedelta(days=10)).isoformat()  # too late
    return body


# --- writers ---------------------------------------------------------------------------------


@dataclass
class Writer:
    number: int
    application: str
    key: str
    tenants: list[str]  # the tenants its key may report for
    base_url: str
    ledger: Ledger
    rng: random.Random
    mine: list[Sent] = field(default_factory=list)  # own events the server accepted
    counter: int = 0
    client: httpx.Client | None = None

    def fresh_id(self) -> str:
        self.counter += 1
        return f"w{self.number}-{self.counter}"

    def post(self, content: bytes, media: str) -> httpx.Response:
        with self.ledger.lock:
            self.ledger.requests += 1
        assert self.client is not None
        return self.client.post(
            "/v1/events",
            content=content,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": media},
        )

    def compose(self, batch_number: int) -> list[Sent]:
        rng = self.rng
        sents: list[Sent] = []
        for _ in range(rng.randint(3, 25)):
            sents.append(
                Sent(self.application, valid_event(rng, self.fresh_id(), self.tenants), "new")
            )
        if self.mine and rng.random() < 0.6:
            earlier = rng.choice(self.mine)
            sents.append(Sent(self.application, dict(earlier.body), "duplicate"))
        if self.mine and rng.random() < 0.5:
            earlier = rng.choice(self.mine)
            changed = dict(earlier.body)
            changed["quantity"] = "7.25" if str(earlier.body["quantity"]) != "7.25" else "8.25"
            sents.append(Sent(self.application, changed, "conflict"))
        if rng.random() < 0.5:
            sents.append(Sent(self.application, invalid_event(rng, self.fresh_id()), "invalid"))
        if set(self.tenants) != set(TENANTS) and rng.random() < 0.4:
            outsider = valid_event(rng, self.fresh_id(), sorted(set(TENANTS) - set(self.tenants)))
            sents.append(Sent(self.application, outsider, "forbidden"))
        hot = f"hot-{batch_number % HOT_IDS}"
        own_version = valid_event(random.Random(f"{hot}-{self.number}"), hot, ["acme"])
        own_version["quantity"] = f"{self.number}.5"  # differs from every other writer's
        sents.append(Sent(self.application, own_version, "hot"))
        rng.shuffle(sents)
        if rng.random() < 0.3:  # the same event twice in one request
            sents.insert(rng.randrange(len(sents) + 1), sents[0])
        return sents

    def send_batch(self, sents: list[Sent], cloud: bool) -> tuple[bytes, str, list[str]]:
        if cloud:
            content = json.dumps([s.cloudevent() for s in sents]).encode()
            media = CLOUDEVENT_BATCH
        else:
            content = json.dumps({"events": [s.body for s in sents]}).encode()
            media = JSON
        response = self.post(content, media)
        assert response.status_code == 200, response.text
        statuses = self.check_report(sents, response.json())
        return content, media, statuses

    def check_report(self, sents: list[Sent], report: dict[str, Any]) -> list[str]:
        outcomes = report["events"]
        assert [o["index"] for o in outcomes] == list(range(len(sents)))
        statuses = [str(o["status"]) for o in outcomes]
        assert report["accepted"] == statuses.count("accepted")
        assert report["duplicates"] == statuses.count("duplicate")
        assert report["rejected"] == statuses.count("rejected")
        seen_here: set[Key] = set()
        for sent, outcome in zip(sents, outcomes, strict=True):
            assert outcome["id"] == sent.body["id"]
            status = outcome["status"]
            again = sent.key in seen_here and sent.kind != "hot"
            if sent.kind in ("invalid", "forbidden"):
                assert status == "rejected", (sent, outcome)
                assert outcome["errors"], outcome
            elif sent.kind == "conflict":
                assert status == "rejected", (sent, outcome)
                assert any(e["pointer"].endswith("/id") for e in outcome["errors"]), outcome
            elif sent.kind == "duplicate" or again:
                assert status == "duplicate", (sent, outcome)
            elif sent.kind == "new":
                assert status == "accepted", (sent, outcome)
            else:
                assert status in ("accepted", "duplicate", "rejected"), outcome
            if status == "accepted":
                seen_here.add(sent.key)
            self.ledger.settle(sent, status)
            if status == "accepted" and sent.kind == "new":
                self.mine.append(sent)
        return statuses

    def retry_verbatim(
        self, sents: list[Sent], content: bytes, media: str, first: list[str]
    ) -> None:
        response = self.post(content, media)
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["accepted"] == 0, report
        for sent, before, outcome in zip(sents, first, report["events"], strict=True):
            after = outcome["status"]
            expected = {"accepted": "duplicate", "duplicate": "duplicate", "rejected": "rejected"}
            assert after == expected[before], (sent, before, outcome)
            self.ledger.settle(sent, after)

    def send_single(self) -> None:
        rng = self.rng
        sent = Sent(self.application, valid_event(rng, self.fresh_id(), self.tenants), "new")
        cloud = rng.random() < 0.5
        content = json.dumps(sent.cloudevent() if cloud else sent.body).encode()
        media = CLOUDEVENT if cloud else JSON
        first = self.post(content, media)
        assert first.status_code == 200, first.text
        assert first.json() == {"id": sent.body["id"], "status": "accepted"}
        self.ledger.settle(sent, "accepted")
        self.mine.append(sent)
        again = self.post(content, media)  # a verbatim retry of a single event
        assert again.status_code == 200, again.text
        assert again.json()["status"] == "duplicate"
        changed = dict(sent.body, quantity="7777")
        conflict = self.post(json.dumps(changed).encode(), JSON)
        assert conflict.status_code == 409, conflict.text
        assert conflict.json()["code"] == "ERR-VAL-409"
        invalid = self.post(json.dumps(invalid_event(rng, self.fresh_id())).encode(), JSON)
        assert invalid.status_code in (400, 403), invalid.text

    def run(self, deadline: float) -> None:
        with httpx.Client(base_url=self.base_url, timeout=HTTP_TIMEOUT) as self.client:
            for batch_number in range(BATCHES_PER_WRITER):
                assert time.monotonic() < deadline, "writer ran out of time"
                sents = self.compose(batch_number)
                cloud = self.rng.random() < 0.4
                content, media, statuses = self.send_batch(sents, cloud)
                if self.rng.random() < 0.35:
                    self.retry_verbatim(sents, content, media, statuses)
                if self.rng.random() < 0.25:
                    self.send_single()


# --- readers ---------------------------------------------------------------------------------


@dataclass
class Reader:
    name: str
    key: str
    params: dict[str, str]
    matches: Callable[[Key, dict[str, Any]], bool]  # on an accepted event as sent
    base_url: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    pages: int = 0
    sweeps: int = 0

    def sweep(self, client: httpx.Client, cursor: str | None) -> tuple[str | None, int]:
        """Pages from `cursor` until has_more is false; (last cursor, events got)."""
        got = 0
        while True:
            params = dict(self.params, limit=str(PAGE_LIMIT))
            if cursor is not None:
                params["cursor"] = cursor
            response = client.get(
                "/v1/events", params=params, headers={"Authorization": f"Bearer {self.key}"}
            )
            assert response.status_code == 200, (self.name, response.text)
            page = response.json()
            self.pages += 1
            self.seen.extend(page["events"])
            got += len(page["events"])
            assert page["next_cursor"], page
            cursor = page["next_cursor"]
            if not page["has_more"]:
                return cursor, got

    def run(self, writers_done: threading.Event, deadline: float) -> None:
        cursor: str | None = None
        with httpx.Client(base_url=self.base_url, timeout=HTTP_TIMEOUT) as client:
            while True:
                assert time.monotonic() < deadline, f"reader {self.name} ran out of time"
                done_before = writers_done.is_set()
                cursor, got = self.sweep(client, cursor)
                self.sweeps += 1
                if done_before and got == 0:
                    return
                if got == 0:
                    time.sleep(0.02)


# --- the test --------------------------------------------------------------------------------


def register(client: httpx.Client, admin: str) -> dict[str, str]:
    """Tenants, applications and keys through the API; returns the keys' secrets by role."""
    headers = {"Authorization": f"Bearer {admin}"}
    for tenant in TENANTS:
        made = client.post("/v1/tenants", json={"id": tenant}, headers=headers)
        assert made.status_code == 201, made.text
    for application in APPLICATIONS:
        made = client.post("/v1/applications", json={"id": application}, headers=headers)
        assert made.status_code == 201, made.text

    def key(**spec: Any) -> str:
        made = client.post("/v1/keys", json=spec, headers=headers)
        assert made.status_code == 201, made.text
        secret: str = made.json()["key"]
        return secret

    keys = {
        f"writer-{n}": key(
            scopes=["events:write"],
            application=APPLICATIONS[n % len(APPLICATIONS)],
            **({"tenants": ["acme", "globex"]} if n == WRITERS - 1 else {}),
        )
        for n in range(WRITERS)
    }
    keys["reader"] = key(scopes=["events:read"])
    keys["acme-reader"] = key(scopes=["events:read"], tenants=["acme"])
    return keys


def exact_sum(values: list[Any]) -> Decimal:
    with localcontext() as context:
        context.prec = 200
        total = Decimal(0)
        for value in values:
            total += Decimal(str(value))
        return total


@pytest.mark.timeout(120)
def test_every_acknowledged_event_is_exported_exactly_once(tally_server: Server) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    base_url = tally_server.base_url
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT) as client:
        keys = register(client, tally_server.admin_key)
    ledger = Ledger()
    writers = [
        Writer(
            number=n,
            application=APPLICATIONS[n % len(APPLICATIONS)],
            key=keys[f"writer-{n}"],
            tenants=["acme", "globex"] if n == WRITERS - 1 else list(TENANTS),
            base_url=base_url,
            ledger=ledger,
            rng=random.Random(1000 + n),
        )
        for n in range(WRITERS)
    ]
    readers = [
        Reader("all", keys["reader"], {}, lambda key, body: True, base_url),
        Reader(
            "tenant=acme", keys["reader"], {"tenant": "acme"},
            lambda key, body: body["tenant"] == "acme", base_url,
        ),
        Reader(
            "type=storage", keys["reader"], {"type": "storage.gib_hours"},
            lambda key, body: body["type"] == "storage.gib_hours", base_url,
        ),
        Reader(
            "application=vm,tenant=globex,type=compute",
            keys["reader"],
            {"application": "vm", "tenant": "globex", "type": "compute.vcpu_seconds"},
            lambda key, body: key[0] == "vm"
            and body["tenant"] == "globex"
            and body["type"] == "compute.vcpu_seconds",
            base_url,
        ),
        Reader(
            "acme-only key", keys["acme-reader"], {},
            lambda key, body: body["tenant"] == "acme", base_url,
        ),
    ]  # fmt: skip
    writers_done = threading.Event()
    with ThreadPoolExecutor(max_workers=len(readers) + len(writers)) as pool:
        reading = [pool.submit(reader.run, writers_done, deadline) for reader in readers]
        writing = [pool.submit(writer.run, deadline) for writer in writers]
        try:
            for future in writing:
                future.result(timeout=DEADLINE_SECONDS)
        finally:
            writers_done.set()
        for future in reading:
            future.result(timeout=DEADLINE_SECONDS)

    accepted = ledger.accepted
    assert not ledger.accepted_twice, f"acknowledged as accepted twice: {ledger.accepted_twice}"
    assert len(accepted) > 100, "too little traffic to prove anything"
    assert ledger.requests > 50

    # Each contested id went to exactly one writer's content (per application).
    assert len(ledger.hot_outcomes) == HOT_IDS * len(APPLICATIONS)
    for key, outcomes in ledger.hot_outcomes.items():
        assert outcomes.count("accepted") == 1, (key, outcomes)

    for reader in readers:
        keys_seen = [(e["application"], e["id"]) for e in reader.seen]
        twice = sorted({k for k in keys_seen if keys_seen.count(k) > 1})
        assert not twice, f"{reader.name} saw events twice: {twice}"
        expected = {key for key, body in accepted.items() if reader.matches(key, body)}
        missing = sorted(expected - set(keys_seen))
        extra = sorted(set(keys_seen) - expected)
        assert not missing, f"{reader.name} missed {missing}\n{tally_server.logs()}"
        assert not extra, f"{reader.name} saw events never acknowledged as accepted: {extra}"
        assert expected, f"{reader.name}'s filter matched nothing: a vacuous check"
        assert reader.sweeps >= 2
        assert exact_sum([e["quantity"] for e in reader.seen]) == exact_sum(
            [body["quantity"] for key, body in accepted.items() if reader.matches(key, body)]
        )

    everything = {(e["application"], e["id"]): e for e in readers[0].seen}
    for key, body in accepted.items():
        exported = everything[key]
        assert isinstance(exported["quantity"], str)
        assert Decimal(exported["quantity"]) == Decimal(str(body["quantity"])), (key, exported)
        assert exported["tenant"] == body["tenant"]
        assert exported["type"] == body["type"]
        assert exported.get("subject") == body.get("subject")
        assert exported.get("unit") == body.get("unit")
        assert exported["attributes"] == body.get("attributes", {})
        assert datetime.fromisoformat(exported["time"]) == datetime.fromisoformat(body["time"])
