"""Shared fixtures: real SQLite files, the machine's real PostgreSQL, the in-process API.

PostgreSQL: each test session creates its own database (named by process id) on the server
at TALLY_TEST_POSTGRES_URL (default: postgres@127.0.0.1:5432), migrates it once, and empties
its tables before each test. Under CI=true an unreachable server fails the tests instead of
skipping them.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.auth.service import Scope
from tally.bootstrap import Services, build
from tally.crypto import keyring as keyrings
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.settings import Settings
from tally.store.interface import EventStore
from tally.store.postgres import PostgresStore
from tally.store.sqlite import SQLiteStore
from tests.support import faults
from tests.support.pgcluster import Cluster, throwaway_cluster

ADMIN_URL = os.environ.get(
    "TALLY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"

_TABLES = (
    "cancellations, events, api_keys, tenant_keys, tenants, applications, audit_log, "
    "attribute_values, meters, log_epochs"
)


def _database_url(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


def postgres_admin() -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection to the test server's admin database; skips the test when the
    server is unreachable (fails it under CI=true)."""
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {ADMIN_URL} is unreachable under CI=true: {error}")
        pytest.skip(f"PostgreSQL at {ADMIN_URL} is unreachable")


@contextmanager
def new_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty database on the test server, dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with postgres_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _database_url(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated database of this session's own on the real PostgreSQL server."""
    with new_database("tally_test") as url:
        store = PostgresStore(url)
        store.migrate()
        store.close()
        yield url


def empty_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"TRUNCATE {_TABLES} CASCADE")
        connection.execute("UPDATE log_partitions SET last_offset = 0")
        # The first epoch, as migration 0007 makes it.
        connection.execute(
            "INSERT INTO log_epochs (seq, epoch, started_at, reason, base) "
            "VALUES (1, uuid_send(gen_random_uuid()), now(), 'created', '[]')"
        )


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs once per store: an SQLite file and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tally.db'}"
    url: str = request.getfixturevalue("postgres_url")
    empty_postgres(url)
    return url


def open_store(url: str) -> EventStore:
    if url.startswith("sqlite:///"):
        store: EventStore = SQLiteStore(Path(url.removeprefix("sqlite:///")))
    else:
        store = PostgresStore(url)
    store.migrate()
    return store


@pytest.fixture
def store(database_url: str) -> Iterator[EventStore]:
    opened = open_store(database_url)
    yield opened
    opened.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster (tests/support/pgcluster.py) for a test that crashes or
    restarts the database; skipped without PostgreSQL's server programs (failed under CI)."""
    try:
        with throwaway_cluster() as started:
            yield started
    except FileNotFoundError as missing:
        if IN_CI:
            raise
        pytest.skip(f"PostgreSQL server programs are not installed: {missing}")


def required_program(name: str, *, package: str) -> str:
    """The path of program `name` a test runs; the test fails under CI=true without it
    (.ci/run installs Debian's `package`), else it is skipped."""
    found = shutil.which(name)
    if found is None:
        if IN_CI:
            pytest.fail(f"{name} is missing under CI=true: install Debian's {package} package")
        pytest.skip(f"{name} is not installed (Debian's {package} package)")
    return found


@pytest.fixture(scope="session")
def keyring_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One master keyring for the session's stores (a PostgreSQL store needs one named)."""
    path = tmp_path_factory.mktemp("keyring") / "tally.keyring"
    keyrings.generate(path)
    return path


@pytest.fixture
def settings(database_url: str, keyring_file: Path) -> Settings:
    return Settings(database_url=database_url, region="eu-west", keyring=str(keyring_file))


@pytest.fixture
def services(settings: Settings, store: EventStore) -> Iterator[Services]:
    built = build(settings, store=store)
    yield built
    built.committer.close()


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services=services), raise_server_exceptions=False) as test_client:
        yield test_client


@dataclass
class World:
    """A registered tenant pair, one application and a key of each kind."""

    admin: str
    writer: str
    reader: str
    acme_reader: str
    acme_writer: str

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def world(services: Services) -> World:
    registry = services.registry
    registry.create_tenant(TenantIn(id="acme"))
    registry.create_tenant(TenantIn(id="globex", lateness_hours=24))
    registry.create_application(ApplicationIn(id="vm"))

    def key(**spec: object) -> str:
        return registry.create_key(KeyIn.model_validate(spec)).key

    return World(
        admin=key(scopes=[Scope.ADMIN]),
        writer=key(scopes=[Scope.EVENTS_WRITE], application="vm"),
        reader=key(scopes=[Scope.EVENTS_READ]),
        acme_reader=key(scopes=[Scope.EVENTS_READ], tenants=["acme"]),
        acme_writer=key(scopes=[Scope.EVENTS_WRITE], application="vm", tenants=["acme"]),
    )


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event(event_id: str, **fields: object) -> dict[str, object]:
    """A valid native event for tenant acme, with `fields` overriding."""
    base: dict[str, object] = {
        "id": event_id,
        "tenant": "acme",
        "type": "compute.vcpu_seconds",
        "quantity": "1",
        "time": now_text(),
    }
    base.update(fields)
    return base


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Every fault scenario's line (tests/faults, tests/ha) at the end of the run, so the
    counts show under plain `pytest` (and -ra) as well as with -s."""
    if faults.LINES:
        terminalreporter.section("fault injection")
        for line in faults.LINES:
            terminalreporter.write_line(line)
