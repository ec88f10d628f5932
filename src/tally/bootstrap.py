"""Everything Tally is made of, built in one place from one `Settings` (nothing at import)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tally.auth.service import Authenticator
from tally.events.cursor import CursorCodec
from tally.events.service import ExportService, IngestService
from tally.registry.service import Registry
from tally.settings import Settings
from tally.store.groupcommit import GroupCommitter
from tally.store.interface import EventStore
from tally.store.postgres import PostgresStore
from tally.store.sqlite import SQLiteStore


def utc_now() -> datetime:
    return datetime.now(UTC)


def open_store(settings: Settings, *, migrate: bool = False) -> EventStore:
    """The store `settings` name, schema checked (or brought up to date when `migrate`).

    Raises StoreUnavailable when it cannot be reached or has no schema.
    """
    path = settings.sqlite_path
    store: SQLiteStore | PostgresStore
    if path is not None:
        store = SQLiteStore(path)
    else:
        store = PostgresStore(settings.database_url, pool_size=settings.pool_size)
    if migrate:
        store.migrate()
    else:
        store.open()
    return store


@dataclass
class Services:
    settings: Settings
    store: EventStore
    committer: GroupCommitter
    authenticator: Authenticator
    registry: Registry
    ingest: IngestService
    export: ExportService

    def close(self) -> None:
        """Commit what is in flight, then release the store."""
        self.committer.close()
        self.store.close()


def build(
    settings: Settings,
    *,
    store: EventStore | None = None,
    clock: Callable[[], datetime] = utc_now,
    observe_batch: Callable[[int, int], None] | None = None,
) -> Services:
    store = store or open_store(settings, migrate=True)
    committer = GroupCommitter(
        store, max_events=settings.commit_max_events, observe=observe_batch, clock=clock
    )
    return Services(
        settings=settings,
        store=store,
        committer=committer,
        authenticator=Authenticator(store, clock=clock),
        registry=Registry(store=store, region=settings.region, clock=clock),
        ingest=IngestService(store=store, committer=committer, clock=clock),
        export=ExportService(store=store, cursors=CursorCodec(store.secret("cursor"))),
    )
