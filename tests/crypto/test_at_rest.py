"""Encryption at rest, end to end through the API on both stores: nothing readable in the raw
database, sealed values bound to their rows, shredding, keyed digests, keyring checks."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from tally.auth.service import Scope
from tally.bootstrap import Services, build, open_keyring
from tally.crypto import keyring as keyrings
from tally.crypto.keyring import Keyring, KeyringError, MasterKey
from tally.crypto.sealing import SealBroken
from tally.events.model import event_content
from tally.registry.models import KeyIn, TenantIn
from tally.settings import Settings
from tally.store.interface import EventStore
from tests.api.helpers import assert_problem, at, auth, export_all, post_events
from tests.conftest import World, event, now_text, open_store


def secret_value() -> str:
    return f"attr-secret-{uuid.uuid4().hex}"


def raw_database(database_url: str) -> bytes:
    """Every byte the store holds for its events and data keys, as an attacker with the files
    (SQLite: the database and its WAL) or with read access to the tables would see them."""
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        files = b"".join(
            candidate.read_bytes()
            for candidate in (path, path.with_name(path.name + "-wal"))
            if candidate.exists()
        )
        # Sealed bytes are kept as base64 text: decode them, or base64 alone would pass.
        with sqlite3.connect(path) as connection:
            columns = [
                row[0]
                for row in connection.execute(
                    "SELECT attributes FROM events UNION ALL SELECT sealed FROM attribute_values"
                )
            ]
        return files + b"".join(base64.b64decode(column) for column in columns)
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT e::text FROM events e UNION ALL SELECT k::text FROM tenant_keys k "
            "UNION ALL SELECT encode(attributes, 'escape') FROM events "
            "UNION ALL SELECT v::text FROM attribute_values v "
            "UNION ALL SELECT encode(sealed, 'escape') FROM attribute_values"
        ).fetchall()
    return "\n".join(row[0] for row in rows).encode()


def test_no_attribute_value_is_stored_in_clear(
    client: TestClient, world: World, database_url: str
) -> None:
    values = [secret_value() for _ in range(3)]
    batch = {
        "events": [
            event("a", attributes={"sku": values[0], "region_hint": values[1]}),
            event("b", tenant="globex", attributes={"note": values[2], "n": 7}),
        ]
    }
    assert post_events(client, world.writer, batch).json()["accepted"] == 2

    raw = raw_database(database_url)

    assert b"globex" in raw  # the rows are there, identifiers in clear ...
    for value in values:
        assert value.encode() not in raw  # ... their attribute values are not
    exported = {e["id"]: e["attributes"] for e in export_all(client, world.reader)}
    assert exported == {
        "a": {"region_hint": values[1], "sku": values[0]},
        "b": {"n": 7, "note": values[2]},
    }


def test_attribute_tokens_and_their_dictionary_hold_no_key_or_value_in_clear(
    client: TestClient, world: World, services: Services, database_url: str
) -> None:
    key, values = f"key-{uuid.uuid4().hex}", [secret_value() for _ in range(2)]
    batch = {
        "events": [
            event("t1", attributes={key: values[0]}),
            event("t2", attributes={key: values[1]}),
            event("t3", attributes={key: values[0]}),
        ]
    }
    assert post_events(client, world.writer, batch).json()["accepted"] == 3
    usage = services.registry.create_key(KeyIn(scopes=[Scope.USAGE_READ])).key

    raw = raw_database(database_url)

    for clear in (key, *values):
        assert clear.encode() not in raw
    # The tokens are there and work: usage groups by them and opens only the dictionary.
    found = client.get(
        "/v1/usage",
        params={
            "from": at(timedelta(hours=-1)),
            "to": at(timedelta(hours=1)),
            "group_by": f"attributes.{key}",
            "aggregation": "count",
        },
        headers=auth(usage),
    ).json()
    assert sorted((r["group"][f"attributes.{key}"], r["value"]) for r in found["rows"]) == sorted(
        [(values[0], 2), (values[1], 1)]
    )
    assert dictionary_size(database_url) == 2  # one entry per distinct value, not per event


def dictionary_size(database_url: str) -> int:
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            return int(connection.execute("SELECT count(*) FROM attribute_values").fetchone()[0])
    with psycopg.connect(database_url) as connection:
        row = connection.execute("SELECT count(*) FROM attribute_values").fetchone()
        assert row is not None
        return int(row[0])


def copy_sealed_attributes(database_url: str, *, source: str, target: str) -> None:
    """What an attacker with write access to the database would do (the append-only trigger
    is switched off first: the test owns this database)."""
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as connection:
            connection.execute("DROP TRIGGER events_no_update")
            connection.execute(
                "UPDATE events SET attributes = (SELECT attributes FROM events WHERE id = ?) "
                "WHERE id = ?",
                (source, target),
            )
        return
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("ALTER TABLE events DISABLE TRIGGER events_append_only")
        try:
            connection.execute(
                "UPDATE events SET attributes = (SELECT attributes FROM events WHERE id = %s) "
                "WHERE id = %s",
                (source, target),
            )
        finally:
            connection.execute("ALTER TABLE events ENABLE TRIGGER events_append_only")


def test_a_sealed_value_copied_onto_another_row_does_not_open(
    client: TestClient, world: World, services: Services, database_url: str
) -> None:
    batch = {"events": [event("a", attributes={"plan": "gold"}), event("b", attributes={})]}
    assert post_events(client, world.writer, batch).json()["accepted"] == 2
    copy_sealed_attributes(database_url, source="a", target="b")

    with pytest.raises(SealBroken):
        services.export.get(
            services.authenticator.authenticate(f"Bearer {world.reader}"), "vm", "b"
        )
    response = client.get("/v1/events/vm/b", headers=auth(world.reader))
    body = assert_problem(response, 500, "ERR-SYS-500")
    assert "gold" not in response.text and body["detail"]
    # The untouched row still opens.
    assert client.get("/v1/events/vm/a", headers=auth(world.reader)).json()["attributes"] == {
        "plan": "gold"
    }


def test_shredding_a_tenant_makes_its_attributes_unreadable_everywhere(
    client: TestClient, world: World, services: Services, settings: Settings, database_url: str
) -> None:
    batch = {
        "events": [
            event("a", quantity="2.5", attributes={"sku": "x1"}),
            event("g", tenant="globex", attributes={"sku": "y2"}),
        ]
    }
    assert post_events(client, world.writer, batch).json()["accepted"] == 2
    # A second process on the same store, its data keys already in memory.
    other = build(settings, store=open_store(database_url))
    try:
        reader = other.authenticator.authenticate(f"Bearer {world.reader}")
        assert other.export.get(reader, "vm", "a").attributes == {"sku": "x1"}

        services.registry.shred_tenant("acme")

        exported = {e["id"]: e for e in export_all(client, world.reader)}
        assert exported["a"]["attributes"] is None and exported["a"]["shredded"] is True
        assert exported["a"]["quantity"] == "2.5"  # what billing needs stays
        assert exported["g"]["attributes"] == {"sku": "y2"} and "shredded" not in exported["g"]
        shredded = other.export.get(reader, "vm", "a")
        assert shredded.shredded and shredded.attributes is None
    finally:
        other.close()
    got = client.get("/v1/events/vm/a", headers=auth(world.reader)).json()
    assert (got["attributes"], got["shredded"]) == (None, True)
    refused = assert_problem(post_events(client, world.writer, event("later")), 400, "ERR-VAL-400")
    assert refused["errors"][0]["pointer"] == "/tenant"
    assert "shredded" in refused["errors"][0]["detail"]
    # Shredding again is harmless; the key is gone from the store for good.
    services.registry.shred_tenant("acme")
    _, key = services.store.tenants_with_keys(["acme"])["acme"]
    assert key is not None and key.wrapped is None


def test_content_digests_are_keyed_per_tenant(
    client: TestClient, world: World, store: EventStore, database_url: str
) -> None:
    same = {"quantity": "1", "time": now_text(), "attributes": {"sku": "a"}}
    batch = {"events": [event("x", **same), event("y", tenant="globex", **same)]}
    assert post_events(client, world.writer, batch).json()["accepted"] == 2

    digests = stored_digests(database_url)
    assert len(set(digests.values())) == 2
    stored = store.get_event("vm", "x")
    assert stored is not None
    assert (stored.tenant, stored.subject, stored.unit) == ("acme", None, None)
    plain = hashlib.sha256(event_content(stored, '{"sku":"a"}')).digest()
    assert plain not in digests.values()


def stored_digests(database_url: str) -> dict[str, bytes]:
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            rows = connection.execute("SELECT id, digest FROM events").fetchall()
        return {row[0]: bytes.fromhex(row[1]) for row in rows}
    with psycopg.connect(database_url) as connection:
        found = connection.execute("SELECT id, digest FROM events").fetchall()
    return {row[0]: bytes(row[1]) for row in found}


def test_a_keyring_that_does_not_fit_the_store_stops_start_up(
    client: TestClient, world: World, settings: Settings, database_url: str, tmp_path: Path
) -> None:
    assert post_events(client, world.writer, event("a")).json()["status"] == "accepted"
    unrelated = tmp_path / "unrelated.keyring"
    keyrings.generate(unrelated)
    with pytest.raises(KeyringError, match="does not have"):
        build(
            settings.model_copy(update={"keyring": str(unrelated)}), store=open_store(database_url)
        )

    # Same key id, other key material: caught by opening a data key, not by the id.
    assert settings.keyring is not None
    real = keyrings.load(settings.keyring)
    forged = tmp_path / "forged.keyring"
    keyrings.write(
        forged,
        Keyring(tuple(MasterKey(k.id, bytes(32)) for k in real.keys), str(forged)),
        replace=False,
    )
    with pytest.raises(KeyringError, match="does not open"):
        build(settings.model_copy(update={"keyring": str(forged)}), store=open_store(database_url))


def test_postgres_without_a_keyring_refuses_to_start(postgres_url: str) -> None:
    with pytest.raises(KeyringError, match="TALLY_KEYRING is not set"):
        build(Settings(database_url=postgres_url, keyring=None))


@pytest.fixture
def default_store(tmp_path: Path) -> Iterator[Settings]:
    yield Settings(database_url=f"sqlite:///{tmp_path / 'tally.db'}", keyring=None)


def test_sqlite_without_a_keyring_makes_an_owner_only_one_beside_the_store(
    default_store: Settings, tmp_path: Path
) -> None:
    services = build(default_store)
    try:
        made = tmp_path / "tally.db.keyring"
        assert stat.S_IMODE(made.stat().st_mode) == 0o600
        first = made.read_text()
        store = services.store
        _, created_again = open_keyring(default_store, store)
        assert created_again is None and made.read_text() == first
        services.registry.create_tenant(TenantIn(id="acme"))
        services.keys.ciphers_of(["acme"])  # the tenant's data key now depends on this keyring
        made.unlink()
        with pytest.raises(KeyringError, match="is missing"):
            open_keyring(default_store, store)
        assert not made.exists()  # and no new, wrong keyring was made in its place
    finally:
        services.close()


def test_exports_of_tenants_with_many_events_open_every_page(
    client: TestClient, world: World
) -> None:
    values = {f"e{i}": secret_value() for i in range(30)}
    batch = {
        "events": [
            event(i, tenant="acme" if n % 2 else "globex", attributes={"v": v})
            for n, (i, v) in enumerate(values.items())
        ]
    }
    assert post_events(client, world.writer, batch).json()["accepted"] == 30
    pages: dict[str, str] = {}
    query: dict[str, object] = {"limit": 7}
    while True:
        page = client.get("/v1/events", params=query, headers=auth(world.reader)).json()
        pages.update({e["id"]: e["attributes"]["v"] for e in page["events"]})
        if not page["has_more"]:
            break
        query["cursor"] = page["next_cursor"]
    assert pages == values
