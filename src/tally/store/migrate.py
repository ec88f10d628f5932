"""Versioned schema migrations with yoyo: plain SQL files per backend in migrations/<backend>/.

yoyo records what it applied in its own table and takes a lock, so two processes starting
together do not both migrate.
"""

from __future__ import annotations

from pathlib import Path

from yoyo import get_backend, read_migrations

MIGRATIONS = Path(__file__).parent / "migrations"


def apply(yoyo_url: str, backend: str) -> list[str]:
    """Apply every pending migration of `backend` ('sqlite' or 'postgresql'); their ids."""
    database = get_backend(yoyo_url)
    migrations = read_migrations(str(MIGRATIONS / backend))
    with database.lock():
        pending = database.to_apply(migrations)
        database.apply_migrations(pending)
    applied = [migration.id for migration in pending]
    database.connection.close()
    return applied


def known(backend: str) -> list[str]:
    """The ids of every migration of `backend` that this version of Tally ships."""
    return [migration.id for migration in read_migrations(str(MIGRATIONS / backend))]
