"""The PostgreSQL store's connections, on the real server.

A replicated store's URL: several hosts, `target_session_attrs=read-write`. The first host
refuses (nothing listens there), libpq goes on to the next: the migrations (yoyo, on a
connection psycopg opened), the grants and the store all connect as the pool does. A pooled
connection that turned read-only (its server was demoted) is closed, not kept: the next
request connects anew. A pool whose connections are all in use refuses after its timeout."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import psycopg
import pytest
from typer.testing import CliRunner

from tally.cli.main import app
from tally.errors import StoreUnavailable
from tally.store import migrate
from tally.store.postgres import PostgresStore, libpq_url
from tests.conftest import new_database
from tests.support.server import free_port

pytestmark = pytest.mark.postgres


def multihost(url: str) -> str:
    """`url` (one host) behind a host that refuses, as a read-write multi-host URL."""
    scheme, rest = url.split("://", 1)
    user, _, location = rest.rpartition("@")
    hosts, _, path = location.partition("/")
    head = f"{user}@" if user else ""
    return (
        f"{scheme}://{head}127.0.0.1:{free_port()},{hosts}/{path}?target_session_attrs=read-write"
    )


@pytest.fixture
def multihost_url() -> Iterator[str]:
    with new_database("tally_multihost") as url:
        yield multihost(url)


def test_libpq_url_changes_only_the_scheme() -> None:
    url = "postgresql+psycopg://u:p%40ss@h1:5432,[::1]:5433/db?target_session_attrs=read-write"
    assert libpq_url(url) == (
        "postgresql://u:p%40ss@h1:5432,[::1]:5433/db?target_session_attrs=read-write"
    )
    assert libpq_url("postgres://h/db") == "postgresql://h/db"


def test_tally_migrate_and_the_store_work_on_a_multihost_url(multihost_url: str) -> None:
    migrated = CliRunner().invoke(
        app, ["migrate", "--json"], env={"TALLY_DATABASE_URL": multihost_url}
    )

    assert migrated.exit_code == 0, migrated.output
    assert json.loads(migrated.stdout) == {"status": "current"}
    with psycopg.connect(multihost_url) as connection:
        applied = connection.execute("SELECT migration_id FROM _yoyo_migration").fetchall()
    assert sorted(row[0] for row in applied) == sorted(migrate.known("postgresql"))
    store = PostgresStore(multihost_url).open()
    try:
        store.ping()
        assert store.partitions > 0
        assert store.migrate() == []  # current already: nothing to apply again
    finally:
        store.close()


def test_a_connection_turned_read_only_is_closed_and_the_next_one_writes(
    multihost_url: str,
) -> None:
    store = PostgresStore(multihost_url, pool_size=1)
    store.migrate()
    try:
        # What a demoted primary's sessions see: writes refused, reads still answered.
        with store._connection() as connection:  # the pool's one connection
            connection.execute("SET default_transaction_read_only = on")
            before = connection.info.backend_pid
        with pytest.raises(StoreUnavailable):
            store.secret("read-only")
        with store._connection() as connection:
            after = connection.info.backend_pid
        assert after != before
        assert store.secret("read-only") == store.secret("read-only")
    finally:
        store.close()


def test_an_unreachable_multihost_url_is_unavailable() -> None:
    refused = f"postgresql://postgres@127.0.0.1:{free_port()},127.0.0.1:{free_port()}/t"
    with pytest.raises(StoreUnavailable):
        PostgresStore(refused, connect_timeout=1).open()
    with pytest.raises(psycopg.OperationalError, match="Connection refused"):
        migrate.apply(refused, "postgresql")


def test_a_pool_with_every_connection_in_use_is_unavailable_after_its_timeout(
    multihost_url: str,
) -> None:
    store = PostgresStore(multihost_url, pool_size=1, connect_timeout=0.5)
    store.migrate()
    try:
        with store._connection():  # the only one
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no free connection"):
                store.ping()
            assert 0.4 < time.monotonic() - started < 3
        store.ping()  # given back: usable again
    finally:
        store.close()
