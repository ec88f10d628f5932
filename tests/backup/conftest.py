"""Stores of either kind filled with every kind of row through the API, and backups of them.

`make_store("sqlite"|"postgres")` gives a new, migrated store of its own (a file in tmp_path, or
a new database on the test server, dropped afterwards); `fill` puts in it, through the services
and the HTTP API, tenants (one updated, one shredded), an application, keys (one used, one
rotated, one revoked), a meter, events with sealed attributes over two months, cancellations,
attribute tokens and their dictionary, and the audit entries all of that records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally import bootstrap
from tally.api.app import create_app
from tally.auth.service import Scope
from tally.backup import schema, service
from tally.bootstrap import Services, build
from tally.crypto import keyring as keyrings
from tally.crypto.keyring import Keyring
from tally.registry.audit import Actor, AuditEntry
from tally.registry.models import ApplicationIn, KeyIn, TenantIn, TenantPatch
from tally.settings import Settings
from tally.store import migrate, snapshot
from tally.store.interface import EventStore
from tests.api.helpers import auth, export_all, post_events
from tests.conftest import new_database, open_store

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
KINDS = ("sqlite", "postgres")


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Made:
    """A store of the test's own, open, and the settings that name it."""

    kind: str
    url: str
    settings: Settings
    store: EventStore

    def target(self) -> service.Target:
        path = self.settings.sqlite_path
        return service.Target(sqlite_path=path, url=None if path else self.url)

    def reopen(self) -> EventStore:
        """The store opened anew (after a restore, which opens and closes it itself)."""
        self.store.close()
        self.store = open_store(self.url)
        return self.store


MakeStore = Callable[[str], Made]


@pytest.fixture
def keyring(keyring_file: Path) -> Keyring:
    return keyrings.load(str(keyring_file))


@pytest.fixture
def make_store(tmp_path: Path, keyring_file: Path) -> Iterator[MakeStore]:
    """New, migrated stores of either kind, each on its own (closed and dropped at the end)."""
    with ExitStack() as stack:
        made: list[Made] = []

        def make(kind: str) -> Made:
            if kind == "sqlite":
                url = f"sqlite:///{tmp_path / f'store-{len(made)}.db'}"
            else:
                url = stack.enter_context(new_database("h9_backup"))
            settings = Settings(database_url=url, region="eu-west", keyring=str(keyring_file))
            made.append(Made(kind, url, settings, open_store(url)))
            stack.callback(lambda last=made[-1]: last.store.close())
            return made[-1]

        yield make


SMALL = 512  # bytes of plaintext per chunk: a small store's backup has dozens


def filled(make_store: MakeStore, kind: str = "sqlite") -> Made:
    """A new store of `kind` that `fill` filled."""
    made = make_store(kind)
    clock = Clock()
    with serving(made, clock) as (services, client):
        fill(services, client, clock)
    return made


@pytest.fixture
def backup(make_store: MakeStore, keyring: Keyring, tmp_path: Path) -> Path:
    """A backup of a filled SQLite store, in chunks of SMALL bytes."""
    path = tmp_path / "good.tbk"
    service.take(filled(make_store).store, path, keyring=keyring, now=NOW, chunk_bytes=SMALL)
    return path


@contextmanager
def serving(made: Made, clock: Clock | None = None) -> Iterator[tuple[Services, TestClient]]:
    """The services and the in-process API over `made`'s store."""
    services = build(made.settings, store=made.store, clock=clock or Clock())
    try:
        with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
            yield services, client
    finally:
        services.committer.close()


@dataclass(frozen=True)
class Keys:
    admin: str
    writer: str
    reader: str


def ingest(client: TestClient, key: str, events: list[dict[str, Any]]) -> None:
    response = post_events(client, key, {"events": events})
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == len(events), response.text


def ev(event_id: str, time: str, quantity: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "tenant": "acme",
        "type": "compute.vcpu_seconds",
        "quantity": quantity,
        "time": time,
        **fields,
    }


def fill(services: Services, client: TestClient, clock: Clock) -> Keys:
    """Every kind of row, made the way Tally makes them (see the module docstring)."""
    registry = services.registry
    registry.create_tenant(TenantIn(id="acme", lateness_hours=840))
    registry.create_tenant(TenantIn(id="globex", name="Globex", lateness_hours=840))
    registry.create_tenant(TenantIn(id="initech", lateness_hours=840))
    registry.update_tenant("globex", TenantPatch(name="Globex Corp"))
    registry.create_application(ApplicationIn(id="vm", name="Virtual machines"))
    admin = registry.create_key(KeyIn(scopes=[Scope.ADMIN])).key
    writer = registry.create_key(KeyIn(scopes=[Scope.EVENTS_WRITE], application="vm")).key
    reader = registry.create_key(KeyIn(scopes=[Scope.EVENTS_READ, Scope.USAGE_READ])).key
    spare = registry.create_key(KeyIn(scopes=[Scope.EVENTS_READ], tenants=["acme"]))
    registry.rotate_key(spare.id, grace=timedelta(hours=1))
    doomed = registry.create_key(KeyIn(scopes=[Scope.EVENTS_READ]))
    registry.revoke_key(doomed.id)
    ingest(
        client,
        writer,
        [
            ev("feb-1", "2026-02-05T10:00:00Z", "0.1", attributes={"sku": "std", "cpu": 2}),
            ev("feb-2", "2026-02-27T23:59:59.999999Z", "12345678901234567890.123456789012345678"),
            ev("feb-3", "2026-02-10T00:00:00Z", "7", subject="vm-7", unit="s"),
            ev("mar-1", "2026-03-01T00:00:00Z", "0.2", attributes={"sku": "big", "spot": True}),
            ev("mar-2", "2026-03-02T11:00:00+02:00", "3", type="storage.gib_hours", unit="GiB"),
            ev("g-1", "2026-03-01T08:00:00Z", "5", tenant="globex", attributes={"zone": "a"}),
            ev("i-1", "2026-02-20T08:00:00Z", "9", tenant="initech", attributes={"x": "y"}),
        ],
    )
    for event_id, reason in (("feb-3", "reported twice"), ("mar-1", "wrong sku, ünïcode")):
        cancelled = client.post(
            f"/v1/events/vm/{event_id}/cancel", json={"reason": reason}, headers=auth(writer)
        )
        assert cancelled.status_code == 200, cancelled.text
    meter = {
        "id": "vcpu",
        "type": "compute.vcpu_seconds",
        "aggregation": "sum",
        "group_by": ["attributes.sku"],
        "unit": "second",
    }
    assert client.post("/v1/meters", json=meter, headers=auth(admin)).status_code == 201
    registry.shred_tenant("initech")
    assert client.get("/v1/events", headers=auth(reader)).status_code == 200  # last_used_at
    return Keys(admin=admin, writer=writer, reader=reader)


def everything(
    client: Any, key: str, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Every entry after `cursor` (from the start when None) to the end of the export, and
    the cursor after the last; `client` is the in-process API's or a real server's."""
    entries: list[dict[str, Any]] = []
    while True:
        params = {"limit": 50} | ({"cursor": cursor} if cursor else {})
        response = client.get("/v1/events", params=params, headers=auth(key))
        assert response.status_code == 200, response.text
        page = response.json()
        entries.extend(page["events"])
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return entries, page["next_cursor"]


def identity(entry: dict[str, Any]) -> tuple[str, str, str]:
    """What a billing system de-duplicates entries by."""
    return (entry["kind"], entry["application"], entry["id"])


def export(client: TestClient, keys: Keys) -> list[dict[str, Any]]:
    return export_all(client, keys.reader)


def reconciliation(client: TestClient, keys: Keys) -> list[dict[str, Any]]:
    response = client.get(
        "/v1/reconciliation",
        params={"from": "2026-01-01T00:00:00Z", "to": "2026-04-01T00:00:00Z", "period": "month"},
        headers=auth(keys.reader),
    )
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["rows"]
    return rows


def table_rows(store: EventStore) -> dict[str, list[list[Any]]]:
    """Every table's rows in the neutral encoding, as a backup reads them."""
    with snapshot.reading(store) as snap:
        columns = schema.carried(snap.tables())
        return {
            table: list(
                snap.rows(table, found, order_by=schema.TABLES[table].order_by, cancelled=False)
            )
            for table, found in columns.items()
        }


def restore_into(made: Made, path: Path, keyring: Keyring) -> service.Restored:
    """`tally restore`'s work, as the service does it, into `made` (closed first: a restore
    opens the target itself)."""
    made.store.close()
    return service.restore(
        path,
        made.target(),
        keyring=keyring,
        known_migrations=migrate.known("sqlite" if made.kind == "sqlite" else "postgresql"),
        open_store=lambda: bootstrap.open_store(made.settings, migrate=True),
        audit=lambda action, manifest: _entry(action, manifest.backup_id),
    )


def _entry(action: str, target: str) -> AuditEntry:
    return Actor.cli().entry(action, at=datetime.now(UTC), target=target)
