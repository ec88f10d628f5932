"""For the high-availability tests: a server's tenant, application and keys, and a ledger of
what the clients were told against what the store holds: acknowledged, stored, lost,
duplicated. An event is acknowledged once Tally answered 2xx for it (accepted or duplicate);
lost if acknowledged and not stored; duplicated if stored more than once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx

from tests.conftest import event
from tests.support import faults
from tests.support.server import Server


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acknowledged: set[str] = field(default_factory=set)

    def acknowledge(self, ids: Iterable[str]) -> None:
        with self.lock:
            self.acknowledged.update(ids)

    def settle(self, stored: Counter[str], scenario: str) -> tuple[int, int]:
        """Print the scenario's line; (lost, duplicated)."""
        lost = sorted(self.acknowledged - set(stored))
        count = faults.Count(
            scenario=scenario,
            acknowledged=len(self.acknowledged),
            stored=sum(stored.values()),
            lost=len(lost),
            duplicated=sum(n - 1 for n in stored.values()),
            missing=tuple(lost[:5]),
        )
        print(count.line)  # noqa: T201 - the suite reports each scenario's counts
        faults.LINES.append(count.line)
        return count.lost, count.duplicated


def exported_ids(client: httpx.Client, reader_key: str) -> Counter[str]:
    """How often each event id appears in the export log, paged to its end."""
    seen: Counter[str] = Counter()
    cursor: str | None = None
    while True:
        params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        page = client.get(
            "/v1/events", params=params, headers={"Authorization": f"Bearer {reader_key}"}
        )
        assert page.status_code == 200, page.text
        body = page.json()
        seen.update(str(entry["id"]) for entry in body["events"])
        cursor = body["next_cursor"]
        if not body["has_more"]:
            return seen


@dataclass(frozen=True)
class Keys:
    writer: str
    reader: str


def register(server: Server) -> Keys:
    """Tenant `acme`, application `vm`, a writer and a reader key, through the API."""
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with server.client(timeout=10) as client:
        for path, body in (("/v1/tenants", {"id": "acme"}), ("/v1/applications", {"id": "vm"})):
            made = client.post(path, json=body, headers=headers)
            assert made.status_code == 201, made.text
        keys = [
            client.post("/v1/keys", json=spec, headers=headers)
            for spec in (
                {"scopes": ["events:write"], "application": "vm"},
                {"scopes": ["events:read"]},
            )
        ]
    assert all(made.status_code == 201 for made in keys), [made.text for made in keys]
    return Keys(writer=keys[0].json()["key"], reader=keys[1].json()["key"])


def probe(client: httpx.Client, key: str, event_id: str) -> httpx.Response:
    """One POST of one event, as an outside client would send it."""
    return client.post(
        "/v1/events", json=event(event_id), headers={"Authorization": f"Bearer {key}"}
    )


@dataclass
class Probe:
    """One raw client posting one event at a time, retrying it until a 2xx: what Tally
    answers, and when."""

    name: str = "probe"
    pause: float = 0.05  # seconds between requests
    answers: list[tuple[float, httpx.Response]] = field(default_factory=list)

    def first_after(self, moment: float, *, success: bool = True) -> float | None:
        """When the first 2xx (or, not `success`, the first other answer) after `moment`
        arrived; None: none yet."""
        return min(
            (t for t, a in list(self.answers) if t > moment and a.is_success == success),
            default=None,
        )

    def run(self, base_url: str, key: str, ledger: Ledger, stop: threading.Event) -> None:
        number = 0
        with httpx.Client(base_url=base_url, timeout=5) as client:
            while not stop.is_set():
                event_id = f"{self.name}-{number}"
                try:
                    answer = probe(client, key, event_id)
                except httpx.TransportError:
                    continue
                self.answers.append((time.monotonic(), answer))
                if answer.is_success:
                    ledger.acknowledge([event_id])
                    number += 1
                time.sleep(self.pause)
