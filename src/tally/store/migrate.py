"""Versioned schema migrations with yoyo: plain SQL files per backend in migrations/<backend>/.

yoyo records what it applied in its own table and takes a lock, so two processes starting
together do not both migrate.

On PostgreSQL yoyo runs on a connection psycopg opens from the URL as given: libpq parses it,
so a multi-host URL (`postgresql://u@h1:5432,h2:5432/db?target_session_attrs=read-write`, a
replicated store's) and every libpq parameter work as they do for the store's pool. yoyo's
own URL parsing (urlsplit, one host and one port) is never used for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from yoyo import get_backend, read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import DatabaseURI
from yoyo.migrations import default_migration_table

MIGRATIONS = Path(__file__).parent / "migrations"


class _LibpqBackend(PostgresqlPsycopgBackend):  # type: ignore[misc] # yoyo is untyped
    """yoyo's psycopg 3 backend, connected by libpq from a URL or conninfo string."""

    def connect(self, dburi: Any) -> psycopg.Connection[Any]:
        # Autocommit, as yoyo's own backend connects: it issues BEGIN and COMMIT itself. A
        # timeout per host, as the grants' connections have: a node that is down without
        # refusing (a machine off) must not hold the migration up for minutes.
        return psycopg.connect(dburi.args["conninfo"], autocommit=True, connect_timeout=5)


def _postgresql(conninfo: str) -> Any:
    uri = DatabaseURI(
        scheme="postgresql+psycopg",
        username=None,
        password=None,
        hostname=None,
        port=None,
        database=None,
        args={"conninfo": conninfo},
    )
    backend = _LibpqBackend(uri, default_migration_table)
    try:
        backend.init_database()
    except BaseException:
        backend.connection.close()
        raise
    return backend


def apply(url: str, backend: str) -> list[str]:
    """Apply every pending migration of `backend` and return their ids: 'sqlite' with a
    yoyo URL (sqlite:///PATH), 'postgresql' with anything libpq connects with (a
    postgresql:// URL, multi-host too, or a conninfo string).

    On PostgreSQL raises psycopg.OperationalError when it cannot connect."""
    database = _postgresql(url) if backend == "postgresql" else get_backend(url)
    try:
        migrations = read_migrations(str(MIGRATIONS / backend))
        with database.lock():
            pending = database.to_apply(migrations)
            database.apply_migrations(pending)
    finally:
        database.connection.close()
    return [migration.id for migration in pending]


def known(backend: str) -> list[str]:
    """The ids of every migration of `backend` that this version of Tally ships."""
    return [migration.id for migration in read_migrations(str(MIGRATIONS / backend))]
