"""`tally restore` goes only into an empty store, migrates one without a schema, and leaves the
target empty when it fails; a backup refuses tables it cannot carry and never leaves a file
that looks complete."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import psycopg
import pytest

from tally.backup import service
from tally.backup.fileformat import BackupDamaged
from tally.backup.schema import Unsupported
from tally.backup.service import NotEmpty
from tally.crypto import keyring as keyrings
from tally.crypto.keyring import Keyring
from tally.crypto.sealing import SealBroken
from tally.registry.audit import AuditFilter
from tally.registry.models import TenantIn
from tally.settings import Settings
from tests.backup.conftest import (
    KINDS,
    Clock,
    Made,
    MakeStore,
    filled,
    restore_into,
    serving,
    table_rows,
)
from tests.backup.test_verify import frames, rewritten
from tests.conftest import new_database, open_store

pytestmark = pytest.mark.postgres


def seeded_only(made: Made) -> None:
    """`made`'s store holds nothing but what its migrations made."""
    rows = table_rows(made.reopen())
    assert {table for table, found in rows.items() if found} == {"log_partitions", "log_epochs"}
    assert all(row[1] == 0 for row in rows["log_partitions"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_store_that_holds_anything_is_refused_and_left_as_it_was(
    make_store: MakeStore, backup: Path, keyring: Keyring, kind: str
) -> None:
    target = make_store(kind)
    with serving(target) as (services, _):
        services.registry.create_tenant(TenantIn(id="already-here"))
    before = table_rows(target.store)
    with pytest.raises(
        NotEmpty, match=r"not empty \(1 row in tenants, 1 row in audit_log\).*Nothing was changed"
    ):
        restore_into(target, backup, keyring)
    assert table_rows(target.reopen()) == before


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_restore_leaves_the_store_empty_and_a_good_one_then_succeeds(
    make_store: MakeStore, backup: Path, keyring: Keyring, tmp_path: Path, kind: str
) -> None:
    target = make_store(kind)
    whole = backup.read_bytes()
    cut = tmp_path / "cut.tbk"
    cut.write_bytes(whole[: frames(backup)[-2][0]])  # rows went in before the cut is found
    with pytest.raises(BackupDamaged, match="truncated"):
        restore_into(target, cut, keyring)
    seeded_only(target)

    flipped = bytearray(whole)
    flipped[frames(backup)[-1][0] + 9] ^= 0x04  # the last chunk: the manifest's
    bad = tmp_path / "flipped.tbk"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(BackupDamaged, match="altered"):
        restore_into(target, bad, keyring)
    seeded_only(target)

    restored = restore_into(target, backup, keyring)
    assert restored.manifest.figures.tables["events"] == 7
    # The epochs' append-only trigger, set aside to replace the migration's first epoch,
    # holds again.
    target.store.close()
    with pytest.raises(
        (sqlite3.IntegrityError, psycopg.errors.RaiseException), match="append-only"
    ):
        if kind == "sqlite":
            path = target.settings.sqlite_path
            assert path is not None
            with sqlite3.connect(path) as connection:
                connection.execute("DELETE FROM log_epochs")
        else:
            with psycopg.connect(target.url, autocommit=True) as connection:
                connection.execute("DELETE FROM log_epochs")


@pytest.mark.parametrize("kind", KINDS)
def test_a_store_without_a_schema_is_migrated_first(
    backup: Path, keyring: Keyring, keyring_file: Path, tmp_path: Path, kind: str
) -> None:
    with new_database("h9_backup_fresh") as fresh:
        # Nothing there: no SQLite file yet; a database as `createdb` leaves it.
        url = f"sqlite:///{tmp_path / 'fresh.db'}" if kind == "sqlite" else fresh
        settings = Settings(database_url=url, region="eu-west", keyring=str(keyring_file))
        made = Made(kind, url, settings, open_store(url))
        made.store.close()
        if kind == "sqlite":
            Path(url.removeprefix("sqlite:///")).unlink()
        else:
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        restored = restore_into(made, backup, keyring)
        store = made.reopen()
        assert len(store.list_tenants()) == 3
        assert store.log_epochs()[-1].id == restored.epoch.id
        store.close()


def test_postgresql_identity_columns_continue_after_the_restored_rows(
    make_store: MakeStore, backup: Path, keyring: Keyring
) -> None:
    target = make_store("postgres")
    restore_into(target, backup, keyring)
    store = target.reopen()
    restored = store.list_audit(AuditFilter(), limit=1000)
    with serving(target) as (services, _):
        services.registry.create_tenant(TenantIn(id="after-restore"))
    newest = store.list_audit(AuditFilter(), limit=1)[0]
    assert newest.action == "tenant.create" and newest.seq == restored[0].seq + 1


def test_a_backup_refuses_a_table_it_does_not_know_and_writes_nothing(
    make_store: MakeStore, keyring: Keyring, tmp_path: Path
) -> None:
    source = make_store("sqlite")
    path = source.settings.sqlite_path
    assert path is not None
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE mystery (x INTEGER)")
        connection.execute("ALTER TABLE meters ADD COLUMN colour TEXT")
    out = tmp_path / "out" / "b.tbk"
    out.parent.mkdir()
    with pytest.raises(Unsupported, match=r"table mystery, column meters\.colour"):
        service.take(source.store, out, keyring=keyring, now=Clock()())
    assert list(out.parent.iterdir()) == []


def test_a_backup_that_fails_midway_leaves_the_previous_file_and_no_partial_one(
    make_store: MakeStore, keyring: Keyring, tmp_path: Path
) -> None:
    source, clock = filled(make_store), Clock()
    out = tmp_path / "out" / "b.tbk"
    out.parent.mkdir()
    service.take(source.store, out, keyring=keyring, now=clock())
    previous = out.read_bytes()
    # A keyring without the master key of the tenants' data keys: the backup's own key is
    # wrapped, rows are written, and the first sealed attributes fail to open.
    stranger = keyrings.Keyring((keyrings.new_key(),), "stranger.keyring")
    with pytest.raises(SealBroken, match="does not hold"):
        service.take(source.store, out, keyring=stranger, now=clock())
    assert out.read_bytes() == previous
    assert [p.name for p in out.parent.iterdir()] == ["b.tbk"]


def test_a_backup_of_an_older_schema_restores_and_a_newer_one_is_refused(
    make_store: MakeStore, keyring: Keyring, tmp_path: Path
) -> None:
    source, clock = filled(make_store), Clock()
    path = source.settings.sqlite_path
    assert path is not None
    # The store as it was before migration 0007 (and so before 0008): no epochs.
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE log_epochs")
        connection.execute("DROP INDEX tenant_keys_shredded")
        connection.execute(
            "DELETE FROM _yoyo_migration "
            "WHERE migration_id IN ('0007.log_epochs', '0008.shredded_tenants')"
        )
    older = tmp_path / "older.tbk"
    manifest = service.take(source.store, older, keyring=keyring, now=clock())
    assert manifest.origin.schema_version == "0006.usage"
    assert manifest.figures.log_epoch is None and "log_epochs" not in manifest.figures.tables

    target = make_store("postgres")
    restored = restore_into(target, older, keyring)
    store = target.reopen()
    assert len(store.list_tenants()) == 3
    assert [epoch.id for epoch in store.log_epochs()][-1] == restored.epoch.id

    def from_the_future(lines: list[str]) -> list[str]:
        for n in (0, -1):
            record = json.loads(lines[n])
            (body,) = record.values()
            body["migrations"].append("0099.future")
            lines[n] = json.dumps(record)
        return lines

    newer = rewritten(older, keyring, tmp_path / "newer.tbk", from_the_future)
    fresh = make_store("sqlite")
    with pytest.raises(Unsupported, match=r"newer schema \(migration 0099\.future\)"):
        restore_into(fresh, newer, keyring)
    seeded_only(fresh)
