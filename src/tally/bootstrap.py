"""Everything Tally is made of, built in one place from one `Settings` (nothing at import)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from tally.auth.service import Authenticator
from tally.crypto import keyring as keyrings
from tally.crypto.keyring import Keyring, KeyringError, KeyringSource
from tally.crypto.tenant_keys import TenantKeys
from tally.errors import StoreUnavailable
from tally.events.cursor import CursorCodec
from tally.freshness import Freshness
from tally.metrics import Metrics, open_metrics
from tally.ratelimit.failover import FailoverLimiter
from tally.ratelimit.inprocess import InProcessLimiter
from tally.ratelimit.interface import Limiter
from tally.ratelimit.policy import RateGuard, RatePolicy
from tally.ratelimit.redis_limiter import RedisLimiter
from tally.registry.service import Registry
from tally.services.cancel import CancelService
from tally.services.export import ExportService
from tally.services.ingest import IngestService
from tally.services.reconciliation import ReconciliationService
from tally.services.usage import UsageService
from tally.settings import Settings
from tally.store import grants
from tally.store.groupcommit import GroupCommitter
from tally.store.interface import EventStore
from tally.store.postgres import PostgresStore
from tally.store.sqlite import SQLiteStore

log = structlog.get_logger("tally")


def utc_now() -> datetime:
    return datetime.now(UTC)


def open_store(settings: Settings, *, migrate: bool = False) -> EventStore:
    """The store `settings` name, schema checked (or brought up to date when `migrate`).

    On PostgreSQL, migrations run as the owner role (TALLY_OWNER_DATABASE_URL, else the one
    URL), which then grants the service role its privileges (store/grants.py); the store
    itself always runs as TALLY_DATABASE_URL's role.

    Raises StoreUnavailable when it cannot be reached, has no schema, or the service role may
    not use it.
    """
    path = settings.sqlite_path
    if path is not None:
        sqlite = SQLiteStore(path)
        if migrate:
            sqlite.migrate()
        else:
            sqlite.open()
        return sqlite
    store = PostgresStore(settings.database_url, pool_size=settings.pool_size)
    if migrate:
        grants.migrate_postgresql(
            owner_url=settings.owner_database_url or settings.database_url,
            service_role=settings.service_role or grants.service_role_of(settings.database_url),
        )
    try:
        store.open()
    except store.dialect.privilege as error:
        store.close()
        raise StoreUnavailable(
            "The database role of TALLY_DATABASE_URL may not use Tally's tables: run "
            "'tally migrate' with TALLY_OWNER_DATABASE_URL set, which grants them."
        ) from error
    return store


def open_keyring(settings: Settings, store: EventStore) -> tuple[Keyring, Path | None]:
    """The configured keyring, and the path of a keyring file made just now (else None).

    Unset on SQLite, it is PATH.keyring beside the database, made (owner-only) on the first
    start of a store that has no data key yet, so that the two-command start needs no
    set-up. Unset on PostgreSQL it is an error: a production store's keys are the operator's
    to place. Raises KeyringError saying what to set or restore.
    """
    spec = keyring_spec(settings)
    if settings.keyring is None and not Path(spec).exists():
        if store.data_key_usage():
            raise KeyringError(
                f"This store's data keys need its keyring, and {spec} is missing: restore that "
                "file from your copy, or set TALLY_KEYRING to where the keyring is."
            )
        return keyrings.generate(Path(spec)), Path(spec)
    return keyrings.load(spec), None


def check_keyring(settings: Settings) -> None:
    """Raises KeyringError, before the store is touched, when the keyring is known to be
    wrong already: TALLY_KEYRING unset on PostgreSQL, or a keyring that is named (or sits
    beside the SQLite database) but cannot be read. Whether it opens the store's data keys
    needs the store, and is checked by `open_keyring` and `TenantKeys.verify` once it is open.

    `tally serve` and the commands that write for tenants call this first, so that a start
    that cannot succeed migrates nothing and issues no key.
    """
    spec = keyring_spec(settings)
    if settings.keyring is not None or Path(spec).exists():
        keyrings.load(spec)


def create_secret_file(directory: Path, stem: str) -> tuple[Path, int]:
    """A new, empty file `stem-<random>` in `directory`, owner-only (0600), and its open
    descriptor. O_EXCL: it is never an existing file, or a link planted to one. Raises OSError.
    """
    path = directory / f"{stem}-{secrets.token_hex(4)}"
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def admin_key_directory(settings: Settings) -> Path:
    """Where `tally serve` leaves the first admin key when no terminal shows it: beside the
    SQLite database, or in the working directory."""
    database = settings.sqlite_path
    return database.parent if database is not None else Path.cwd()


def keyring_spec(settings: Settings) -> str:
    """TALLY_KEYRING, or on SQLite the keyring file beside the database. Raises KeyringError
    on PostgreSQL without TALLY_KEYRING."""
    if settings.keyring is not None:
        return settings.keyring
    database = settings.sqlite_path
    if database is None:
        raise KeyringError(
            "TALLY_KEYRING is not set: a PostgreSQL store needs a keyring of master keys. "
            "Make one with 'tally keyring generate --out PATH' and set TALLY_KEYRING=PATH "
            "(or TALLY_KEYRING=command:PROGRAM to read it from a secret manager)."
        )
    return str(database.with_name(database.name + ".keyring"))


@dataclass
class Services:
    settings: Settings
    store: EventStore
    committer: GroupCommitter
    authenticator: Authenticator
    registry: Registry
    ingest: IngestService
    export: ExportService
    reconciliation: ReconciliationService
    cancel: CancelService
    usage: UsageService
    keys: TenantKeys
    rate_limits: RateGuard
    metrics: Metrics

    def close(self) -> None:
        """Commit what is in flight and the audit counts held, then release the store (and
        the rate limiter)."""
        self.committer.close()
        self.registry.close()
        self.store.close()
        self.rate_limits.close()


def open_limiter(settings: Settings) -> Limiter:
    """In-process limits; with TALLY_REDIS_URL, limits shared in Redis that fall back to
    in-process ones while Redis is unreachable. Connects lazily, on the first request."""
    if settings.redis_url is None:
        return InProcessLimiter()
    shared = RedisLimiter(
        settings.redis_url,
        prefix=settings.redis_key_prefix,
        timeout=settings.redis_timeout_ms / 1000,
    )
    return FailoverLimiter(shared, InProcessLimiter())


def build(
    settings: Settings,
    *,
    store: EventStore | None = None,
    clock: Callable[[], datetime] = utc_now,
    observe_batch: Callable[[int, int], None] | None = None,
    limiter: Limiter | None = None,
    keyring: Keyring | None = None,
    metrics: Metrics | None = None,
) -> Services:
    """Everything, from `settings` (or the parts given). Raises KeyringError when the keyring
    is missing or does not open this store's data keys, StoreUnavailable when the store
    cannot be used."""
    store = store or open_store(settings, migrate=True)
    if keyring is None:
        keyring, created = open_keyring(settings, store)
        if created is not None:
            log.warning("keyring_created", path=str(created))
    source = KeyringSource(
        keyring_spec(settings),
        keyring,
        on_error=lambda error: log.warning("keyring_reload_failed", reason=str(error)),
    )
    keys = TenantKeys(store=store, keyring=source, clock=clock)
    keys.verify()
    metrics = open_metrics(settings) if metrics is None else metrics
    committer = GroupCommitter(
        store,
        max_events=settings.commit_max_events,
        observe=observe_batch,
        metrics=metrics,
        clock=clock,
    )
    freshness = Freshness(settings.cache_seconds)
    return Services(
        settings=settings,
        store=store,
        committer=committer,
        authenticator=Authenticator(store, clock=clock, freshness=freshness),
        registry=Registry(store=store, region=settings.region, clock=clock, freshness=freshness),
        ingest=IngestService(
            store=store,
            committer=committer,
            keys=keys,
            clock=clock,
            metrics=metrics,
            freshness=freshness,
        ),
        export=ExportService(
            store=store, cursors=CursorCodec(store.secret("cursor")), keys=keys, metrics=metrics
        ),
        reconciliation=ReconciliationService(store=store, keys=keys, clock=clock),
        cancel=CancelService(store=store, keys=keys, clock=clock),
        usage=UsageService(store=store, keys=keys, clock=clock),
        keys=keys,
        rate_limits=RateGuard(
            open_limiter(settings) if limiter is None else limiter,
            RatePolicy.from_settings(settings),
            metrics,
        ),
        metrics=metrics,
    )
