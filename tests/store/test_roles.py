"""Least privilege on the real PostgreSQL: the owner role migrates, the service role may insert
and select events but never update, delete or truncate them, and may change no schema.

Each test module run creates an owner role, a service role (LOGIN, trust auth) and databases
of its own, named uniquely, and drops them afterwards.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import errors as pg_errors

from tally.api.app import create_app
from tally.auth.service import Scope
from tally.bootstrap import build, open_store
from tally.crypto import keyring as keyrings
from tally.errors import StoreUnavailable
from tally.registry.models import ApplicationIn, KeyIn, TenantIn
from tally.settings import Settings
from tally.store.grants import OWNER_ONLY, SERVICE_PRIVILEGES
from tests.conftest import ADMIN_URL, IN_CI, event

pytestmark = pytest.mark.postgres

TALLY = Path(sys.executable).parent / "tally"
INSUFFICIENT_PRIVILEGE = "42501"


def url_as(role: str, database: str) -> str:
    parts = urlsplit(ADMIN_URL)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}", path=f"/{database}"))


@dataclass
class Roles:
    owner: str
    service: str
    suffix: str
    keyring: Path
    databases: list[str]

    def database(self, label: str) -> str:
        """A fresh database owned by the owner role."""
        name = f"tally_roles_{self.suffix}_{label}"
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}" OWNER "{self.owner}"')
        self.databases.append(name)
        return name

    def settings(self, database: str, *, owner: bool = True) -> Settings:
        return Settings(
            database_url=url_as(self.service, database),
            owner_database_url=url_as(self.owner, database) if owner else None,
            keyring=str(self.keyring),
        )


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Roles]:
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {ADMIN_URL} is unreachable under CI=true: {error}")
        pytest.skip(f"PostgreSQL at {ADMIN_URL} is unreachable")
    suffix = f"{os.getpid()}_{secrets.token_hex(3)}"
    keyring = tmp_path_factory.mktemp("roles") / "tally.keyring"
    keyrings.generate(keyring)
    found = Roles(f"tally_owner_{suffix}", f"tally_service_{suffix}", suffix, keyring, [])
    with admin:
        admin.execute(f'CREATE ROLE "{found.owner}" LOGIN')
        admin.execute(f'CREATE ROLE "{found.service}" LOGIN')
    try:
        yield found
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            for name in found.databases:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'DROP ROLE IF EXISTS "{found.service}"')
            admin.execute(f'DROP ROLE IF EXISTS "{found.owner}"')


@pytest.fixture(scope="module")
def migrated(roles: Roles) -> str:
    """A database migrated by the owner, with one event stored by the service role."""
    database = roles.database("main")
    store = open_store(roles.settings(database), migrate=True)
    services = build(roles.settings(database), store=store)
    try:
        services.registry.create_tenant(TenantIn(id="acme"))
        services.registry.create_application(ApplicationIn(id="vm"))
        writer = services.registry.create_key(
            KeyIn(scopes=[Scope.EVENTS_WRITE], application="vm")
        ).key
        with TestClient(create_app(services=services)) as client:
            response = client.post(
                "/v1/events", json=event("evt-0"), headers={"Authorization": f"Bearer {writer}"}
            )
            assert response.status_code == 200, response.text
    finally:
        services.close()
    return database


def as_role(roles: Roles, role: str, database: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url_as(role, database), autocommit=True)


def test_the_service_role_ingests_exports_and_administers(roles: Roles, migrated: str) -> None:
    settings = roles.settings(migrated)
    services = build(settings)
    try:
        registry = services.registry
        registry.create_tenant(TenantIn(id="globex"))
        admin = registry.create_key(KeyIn(scopes=[Scope.ADMIN])).key
        with TestClient(create_app(services=services)) as client:

            def call(method: str, path: str, key: str, **kwargs: object) -> dict[str, object]:
                response = client.request(
                    method, path, headers={"Authorization": f"Bearer {key}"}, **kwargs
                )
                assert response.status_code < 300, (method, path, response.text)
                return response.json() if response.content else {}

            writer = call(
                "POST",
                "/v1/keys",
                admin,
                json={"scopes": ["events:write"], "application": "vm"},
            )["key"]
            reader = call("POST", "/v1/keys", admin, json={"scopes": ["events:read"]})
            first = event("evt-1")
            batch = {"events": [first, event("evt-2", tenant="globex"), first]}
            outcome = call("POST", "/v1/events", str(writer), json=batch)
            assert (outcome["accepted"], outcome["duplicates"]) == (2, 1)
            page = call("GET", "/v1/events", str(reader["key"]), params={"limit": 100})
            assert {e["id"] for e in page["events"]} >= {"evt-0", "evt-1", "evt-2"}  # type: ignore[union-attr]
            one = call("GET", "/v1/events/vm/evt-2", str(reader["key"]))
            assert one["tenant"] == "globex"
            call("DELETE", f"/v1/keys/{reader['id']}", admin)
            assert call("GET", "/v1/keys", admin)
    finally:
        services.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET quantity = quantity + 1",
        "DELETE FROM events",
        "TRUNCATE events",
        "DROP TABLE events",
        "ALTER TABLE events DISABLE TRIGGER events_append_only",
        "ALTER TABLE events ADD COLUMN sneaky text",
        "CREATE TABLE sneaky (id int)",
        "DELETE FROM log_partitions",
        "DELETE FROM tenants",
    ],
)
def test_the_service_role_is_refused_what_it_does_not_need(
    roles: Roles, migrated: str, statement: str
) -> None:
    with (
        as_role(roles, roles.service, migrated) as connection,
        pytest.raises(pg_errors.InsufficientPrivilege) as refused,
    ):
        connection.execute(statement)
    assert refused.value.sqlstate == INSUFFICIENT_PRIVILEGE


def test_the_owner_meets_the_append_only_trigger_instead(roles: Roles, migrated: str) -> None:
    # The service role's refusal above is the privilege check, not this trigger: were the
    # grants missing (the service running as the owner), UPDATE would fail here, differently.
    with (
        as_role(roles, roles.owner, migrated) as connection,
        pytest.raises(pg_errors.RaiseException, match="append-only"),
    ):
        connection.execute("UPDATE events SET quantity = quantity + 1")


def test_every_table_has_its_service_privileges_stated_in_one_place(
    roles: Roles, migrated: str
) -> None:
    with as_role(roles, roles.owner, migrated) as connection:
        tables = {
            str(name)
            for (name,) in connection.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
        granted: dict[str, set[str]] = {}
        for table, privilege in connection.execute(
            "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = %s",
            (roles.service,),
        ):
            granted.setdefault(str(table), set()).add(str(privilege))
    assert tables - OWNER_ONLY == set(SERVICE_PRIVILEGES), (
        "a table without a line in store/grants.py SERVICE_PRIVILEGES (or one stated there "
        "that no migration creates)"
    )
    assert granted == {table: set(p) for table, p in SERVICE_PRIVILEGES.items()}
    assert {"UPDATE", "DELETE", "TRUNCATE"}.isdisjoint(granted["events"])


def test_the_service_role_owns_nothing_and_may_not_create(roles: Roles, migrated: str) -> None:
    with as_role(roles, roles.owner, migrated) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = %s",
            (roles.service,),
        ).fetchone()
        creates = connection.execute(
            "SELECT has_schema_privilege(%s, current_schema(), 'CREATE'), "
            "has_database_privilege(%s, current_database(), 'CREATE')",
            (roles.service, roles.service),
        ).fetchone()
    assert row == (0,)
    assert creates == (False, False)


def test_migrating_again_keeps_the_grants(roles: Roles, migrated: str) -> None:
    open_store(roles.settings(migrated), migrate=True).close()
    with as_role(roles, roles.service, migrated) as connection:
        (count,) = connection.execute("SELECT count(*) FROM events").fetchone() or (0,)
        assert isinstance(count, int) and count >= 1
        with pytest.raises(pg_errors.InsufficientPrivilege):
            connection.execute("DELETE FROM events")


def test_the_service_alone_starts_on_a_current_schema_without_the_owner_url(
    roles: Roles, migrated: str
) -> None:
    # Servers need not hold the owner's credentials once the owner has migrated.
    store = open_store(roles.settings(migrated, owner=False), migrate=True)
    try:
        assert store.list_tenants()
    finally:
        store.close()


def test_a_superuser_service_role_is_refused(roles: Roles, migrated: str) -> None:
    settings = Settings(
        database_url=url_as("postgres", migrated),
        owner_database_url=url_as(roles.owner, migrated),
        keyring=str(roles.keyring),
    )
    with pytest.raises(StoreUnavailable, match="superuser"):
        open_store(settings, migrate=True)


def run_tally(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    environment["TALLY_DATABASE_URL"] = settings.database_url
    if settings.keyring is not None:
        environment["TALLY_KEYRING"] = settings.keyring
    if settings.owner_database_url is not None:
        environment["TALLY_OWNER_DATABASE_URL"] = settings.owner_database_url
    return subprocess.run(
        [str(TALLY), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_the_service_alone_cannot_migrate_and_says_what_to_set(roles: Roles) -> None:
    database = roles.database("fresh")
    settings = roles.settings(database, owner=False)

    serving = run_tally(settings, "serve", "--port", "1")
    listing = run_tally(settings, "keys", "list")

    assert serving.returncode != 0
    assert "TALLY_OWNER_DATABASE_URL" in serving.stderr
    assert listing.returncode != 0
    assert "no schema" in listing.stderr
    assert "tally migrate" in listing.stderr
    for result in (serving, listing):
        assert "Traceback" not in result.stdout + result.stderr


def test_a_service_role_without_grants_is_told_to_migrate_as_owner(roles: Roles) -> None:
    database = roles.database("nogrants")
    # Migrated by the owner as its own service: no grants to the service role at all.
    open_store(
        Settings(database_url=url_as(roles.owner, database), keyring=str(roles.keyring)),
        migrate=True,
    ).close()

    listing = run_tally(roles.settings(database, owner=False), "keys", "list")

    assert listing.returncode != 0
    assert "TALLY_OWNER_DATABASE_URL" in listing.stderr
    assert "Traceback" not in listing.stdout + listing.stderr


def test_tally_migrate_migrates_as_the_owner_and_grants(roles: Roles) -> None:
    database = roles.database("cli")
    settings = roles.settings(database)

    migrated = run_tally(settings, "migrate")

    assert migrated.returncode == 0, migrated.stderr
    with as_role(roles, roles.service, database) as connection:
        assert connection.execute("SELECT count(*) FROM log_partitions").fetchone() == (16,)
        with pytest.raises(pg_errors.InsufficientPrivilege):
            connection.execute("TRUNCATE events")
