"""Key rotation, last use and the audit log, run against every store (SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tally.auth import keys
from tally.auth.records import KeyRecord
from tally.errors import AlreadyExists, LastAdminKey
from tally.registry.audit import AuditEntry, AuditFilter
from tally.registry.records import Application, Tenant
from tally.store.interface import EventStore

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def key_record(key_id: str, **fields: object) -> KeyRecord:
    base: dict[str, object] = {
        "id": key_id,
        "secret_hash": keys.secret_hash(keys.new_secret()),
        "scopes": ("events:read",),
        "application": None,
        "tenants": None,
        "created_at": NOW - timedelta(days=1),
        "expires_at": None,
        "revoked_at": None,
    }
    base.update(fields)
    return KeyRecord(**base)  # type: ignore[arg-type]


def entry(action: str, *, target: str | None = None, **fields: object) -> AuditEntry:
    base: dict[str, object] = {
        "at": NOW,
        "actor": "cli:alice",
        "action": action,
        "target": target,
        "details": {},
        "source": "cli",
        "request_id": None,
    }
    base.update(fields)
    return AuditEntry(**base)  # type: ignore[arg-type]


def actions(store: EventStore, **filters: object) -> list[str]:
    return [r.action for r in store.list_audit(AuditFilter(**filters), limit=1000)]  # type: ignore[arg-type]


def test_each_registration_is_recorded_with_its_action(store: EventStore) -> None:
    store.create_tenant(
        Tenant(id="acme", name=None, region="eu", lateness_hours=72, created_at=NOW),
        audit=entry("tenant.create", target="acme", details={"region": "eu"}),
    )
    store.create_application(
        Application(id="vm", name=None, created_at=NOW),
        audit=entry("application.create", target="vm"),
    )
    store.create_key(key_record("key_a"), audit=entry("key.create", target="key_a"))
    assert store.revoke_key("key_a", at=NOW, audit=entry("key.revoke", target="key_a"))

    listed = store.list_audit(AuditFilter(), limit=10)
    assert [r.action for r in listed] == [
        "key.revoke",
        "key.create",
        "application.create",
        "tenant.create",
    ]
    assert [r.seq for r in listed] == sorted((r.seq for r in listed), reverse=True)
    oldest = listed[-1]
    assert (oldest.actor, oldest.target, oldest.details, oldest.source, oldest.at) == (
        "cli:alice",
        "acme",
        {"region": "eu"},
        "cli",
        NOW,
    )


def test_a_refused_action_records_nothing(store: EventStore) -> None:
    tenant = Tenant(id="acme", name=None, region="eu", lateness_hours=72, created_at=NOW)
    store.create_tenant(tenant, audit=entry("tenant.create", target="acme"))
    with pytest.raises(AlreadyExists):
        store.create_tenant(tenant, audit=entry("tenant.create", target="acme"))
    store.create_key(key_record("key_a"), audit=entry("key.create", target="key_a"))
    with pytest.raises(AlreadyExists):
        store.create_key(key_record("key_a"), audit=entry("key.create", target="key_a"))
    assert not store.revoke_key("key_nope", at=NOW, audit=entry("key.revoke"))
    assert actions(store) == ["key.create", "tenant.create"]


def test_rotation_links_both_keys_and_retires_the_old_one(store: EventStore) -> None:
    store.create_key(key_record("key_old", expires_at=NOW + timedelta(days=90)))
    new = key_record("key_new", created_at=NOW, rotated_from="key_old")
    retire = NOW + timedelta(hours=1)

    assert store.rotate_key(
        "key_old", new=new, old_expires_at=retire, now=NOW, audit=entry("key.rotate")
    )

    old = store.get_key("key_old")
    assert old is not None
    assert (old.expires_at, old.replaced_by, old.rotated_from) == (retire, "key_new", None)
    assert store.find_key(new.secret_hash) == new
    assert actions(store) == ["key.rotate"]


@pytest.mark.parametrize(
    "old",
    [
        key_record("key_old", revoked_at=NOW - timedelta(minutes=1)),
        key_record("key_old", expires_at=NOW - timedelta(minutes=1)),
        key_record("key_old", expires_at=NOW),
        key_record("key_old", replaced_by="key_other"),
    ],
    ids=["revoked", "expired", "expiring-now", "rotated-already"],
)
def test_a_key_that_cannot_be_rotated_changes_nothing(store: EventStore, old: KeyRecord) -> None:
    store.create_key(old)
    new = key_record("key_new", created_at=NOW, rotated_from="key_old")

    rotated = store.rotate_key(
        "key_old", new=new, old_expires_at=NOW, now=NOW, audit=entry("key.rotate")
    )

    assert not rotated
    assert store.get_key("key_old") == old
    assert store.get_key("key_new") is None
    assert actions(store) == []


def test_an_unknown_key_cannot_be_rotated(store: EventStore) -> None:
    new = key_record("key_new", created_at=NOW, rotated_from="key_nope")
    assert not store.rotate_key("key_nope", new=new, old_expires_at=NOW, now=NOW)
    assert store.get_key("key_new") is None


def test_concurrent_rotations_of_one_key_make_one_replacement(store: EventStore) -> None:
    store.create_key(key_record("key_old"))
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def rotate(n: int) -> None:
        new = key_record(f"key_new{n}", created_at=NOW, rotated_from="key_old")
        barrier.wait()
        results.append(
            store.rotate_key(
                "key_old", new=new, old_expires_at=NOW, now=NOW, audit=entry("key.rotate")
            )
        )

    threads = [threading.Thread(target=rotate, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == [False, False, False, True]
    old = store.get_key("key_old")
    assert old is not None
    assert [k.id for k in store.list_keys() if k.rotated_from == "key_old"] == [old.replaced_by]
    assert actions(store) == ["key.rotate"]


def test_last_use_is_written_at_most_once_per_interval(store: EventStore) -> None:
    store.create_key(key_record("key_a"))
    every = timedelta(minutes=1)

    def last_used() -> datetime | None:
        found = store.get_key("key_a")
        assert found is not None
        return found.last_used_at

    assert last_used() is None
    store.touch_key("key_a", at=NOW, every=every)
    assert last_used() == NOW
    store.touch_key("key_a", at=NOW + timedelta(seconds=59), every=every)
    assert last_used() == NOW
    store.touch_key("key_a", at=NOW + timedelta(seconds=60), every=every)
    assert last_used() == NOW + timedelta(seconds=60)
    store.touch_key("key_nope", at=NOW, every=every)  # no such key: nothing happens


def test_audit_listing_filters_and_pages(store: EventStore) -> None:
    for n in range(5):
        store.record_audit(
            entry(
                "key.create" if n % 2 == 0 else "access.denied",
                actor="key_admin" if n < 3 else "cli:bob",
                at=NOW + timedelta(minutes=n),
                target=f"t{n}",
            )
        )
    everything = store.list_audit(AuditFilter(), limit=10)
    assert [r.target for r in everything] == ["t4", "t3", "t2", "t1", "t0"]

    def targets(**filters: object) -> list[str | None]:
        found = store.list_audit(AuditFilter(**filters), limit=10)  # type: ignore[arg-type]
        return [r.target for r in found]

    assert targets(action="key.create") == ["t4", "t2", "t0"]
    assert targets(actor="cli:bob") == ["t4", "t3"]
    assert targets(since=NOW + timedelta(minutes=2)) == ["t4", "t3", "t2"]
    assert targets(before=everything[1].seq) == ["t2", "t1", "t0"]
    assert targets(action="key.create", actor="key_admin", before=everything[2].seq) == ["t0"]
    assert [r.target for r in store.list_audit(AuditFilter(), limit=2)] == ["t4", "t3"]


def raw_execute(database_url: str, sql: str) -> None:
    if database_url.startswith("sqlite:///"):
        connection = sqlite3.connect(Path(database_url.removeprefix("sqlite:///")))
        try:
            connection.execute(sql)
            connection.commit()
        finally:
            connection.close()
    else:
        with psycopg.connect(database_url, autocommit=True) as pg:
            pg.execute(sql)


@pytest.mark.parametrize(
    "sql",
    ["UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"],
    ids=["update", "delete"],
)
def test_the_audit_log_is_append_only(store: EventStore, database_url: str, sql: str) -> None:
    store.record_audit(entry("key.create", target="key_a"))
    with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="append-only"):
        raw_execute(database_url, sql)
    [kept] = store.list_audit(AuditFilter(), limit=10)
    assert (kept.actor, kept.target) == ("cli:alice", "key_a")


def test_the_last_admin_key_that_stays_valid_is_not_revoked(store: EventStore) -> None:
    store.create_key(key_record("key_admin", scopes=("admin",)))
    store.create_key(key_record("key_gone", scopes=("admin",), revoked_at=NOW))
    store.create_key(key_record("key_old", scopes=("admin",), expires_at=NOW))
    store.create_key(key_record("key_retiring", scopes=("admin",), replaced_by="key_admin"))
    store.create_key(key_record("key_reader"))

    with pytest.raises(LastAdminKey):
        store.revoke_key("key_admin", at=NOW, audit=entry("key.revoke"), keep_an_admin=True)

    found = store.get_key("key_admin")
    assert found is not None and found.revoked_at is None
    assert actions(store) == []
    # Keys whose revocation takes no admin away are revoked as before, even now that none
    # but key_admin stays valid.
    for other in ("key_gone", "key_old", "key_retiring", "key_reader"):
        assert store.revoke_key(other, at=NOW, keep_an_admin=True)
    # Without the guard (the CLI's --force), the last one goes too.
    assert store.revoke_key("key_admin", at=NOW, audit=entry("key.revoke"))
    # With no admin key valid any more, revoking an expired one still takes nothing away.
    store.create_key(key_record("key_lapsed", scopes=("admin",), expires_at=NOW))
    assert store.revoke_key("key_lapsed", at=NOW, keep_an_admin=True)


def test_concurrent_revocations_of_the_last_two_admin_keys_leave_one(store: EventStore) -> None:
    for round_ in range(5):  # a race that one round could miss by luck
        ids = [f"key_{round_}_a", f"key_{round_}_b"]
        for key_id in ids:
            store.create_key(key_record(key_id, scopes=("admin",)))
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def revoke(key_id: str, barrier: threading.Barrier, outcomes: list[str]) -> None:
            barrier.wait()
            try:
                store.revoke_key(key_id, at=NOW, keep_an_admin=True)
                outcomes.append("revoked")
            except LastAdminKey:
                outcomes.append("refused")

        threads = [
            threading.Thread(target=revoke, args=(key_id, barrier, outcomes)) for key_id in ids
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert sorted(outcomes) == ["refused", "revoked"]
        left = [key_id for key_id in ids if (k := store.get_key(key_id)) and not k.revoked_at]
        assert len(left) == 1
        # The survivor is now the round's only valid admin key: retire it (unguarded) so the
        # next round starts from its own two.
        assert store.revoke_key(left[0], at=NOW)


def test_a_tenant_update_is_a_compare_and_set_recorded_with_it(store: EventStore) -> None:
    acme = Tenant(id="acme", name=None, region="eu", lateness_hours=72, created_at=NOW)
    store.create_tenant(acme)
    renamed = Tenant(id="acme", name="Acme", region="eu", lateness_hours=24, created_at=NOW)

    assert store.update_tenant(acme, renamed, audit=entry("tenant.update", target="acme"))
    assert store.get_tenants(["acme"])["acme"] == renamed
    # A writer that read the old row loses: nothing changes and nothing is recorded.
    stale = Tenant(id="acme", name=None, region="eu", lateness_hours=1, created_at=NOW)
    assert not store.update_tenant(acme, stale, audit=entry("tenant.update", target="acme"))
    gone = Tenant(id="initech", name=None, region="eu", lateness_hours=1, created_at=NOW)
    assert not store.update_tenant(gone, gone)
    assert store.get_tenants(["acme"])["acme"] == renamed
    assert actions(store) == ["tenant.update"]


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE tenants SET region = 'us-east'",
        "UPDATE tenants SET id = 'initech'",
        "UPDATE tenants SET created_at = '2000-01-01T00:00:00.000000Z'",
    ],
    ids=["region", "id", "created_at"],
)
def test_a_tenant_keeps_its_id_region_and_creation_time(
    store: EventStore, database_url: str, sql: str
) -> None:
    acme = Tenant(id="acme", name=None, region="eu", lateness_hours=72, created_at=NOW)
    store.create_tenant(acme)
    with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="never change"):
        raw_execute(database_url, sql)
    assert store.get_tenants(["acme"]) == {"acme": acme}
