"""The big store: 10,000 tenants and 10 million events over a few past months, on PostgreSQL.

Loading that through HTTP would take hours at today's rates, so it is loaded in-process
through Tally's own code: each event is an `EventDraft` sealed by `services/ingest.seal_event`
with its tenant's data key (attributes sealed, tokenised, the content digested: exactly what
the server stores, so the export opens it) and appended by `store.append` in batches of
`BATCH` from several processes. `IngestService.ingest` is not used because it refuses events
older than the tenant's lateness window (840 hours at most), and these lie months back; the
store itself takes any time, as it does for a restore.

The database `tally_bench_big_<events>_<tenants>_s<schema>_v<loader>` is kept between runs,
with its keyring in bench/.state/, and reused when its marker row (table `bench_big_store`,
written last) says it is complete; `--rebuild` makes it again.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from bench import servers
from tally.bootstrap import Services, build
from tally.crypto import keyring as keyrings
from tally.events.model import NewEvent
from tally.events.validation import EventDraft
from tally.registry.models import ApplicationIn, TenantIn
from tally.services.ingest import seal_event
from tally.settings import Settings

# 2: batches of 1,000 (as the batch scenario sends them), appended in log order (plan.accepted)
LOADER_VERSION = 2
BATCH = 1_000
MONTHS = 3
STATE = Path(__file__).resolve().parent / ".state"
MIGRATIONS = Path(__file__).resolve().parents[1] / "src/tally/store/migrations/postgresql"
TYPES = (("llm.tokens", "token"), ("llm.tokens", "token"), ("compute.vcpu_seconds", "s"))
REGIONS = ("eu-west", "eu-central", "us-east", "ap-south")
PLANS = ("free", "pro", "enterprise")
MODELS = ("small", "medium", "large", "xl", "embed")
FEATURES = ("chat", "search", "batch", "tools", "vision", "audio")
CONTEXTS = (128, 256, 512, 1024, 2048)


def schema_version() -> str:
    return max(path.name.split(".", 1)[0] for path in MIGRATIONS.glob("*.sql"))


def tenant_id(index: int) -> str:
    return f"t{index:05d}"


def month_starts(first: datetime, count: int) -> list[datetime]:
    starts = [first]
    for _ in range(count):
        last = starts[-1]
        starts.append(datetime(last.year + last.month // 12, last.month % 12 + 1, 1, tzinfo=UTC))
    return starts  # count + 1 boundaries


@dataclass(frozen=True)
class Layout:
    """Where event k goes: tenant k mod T, month (k div T) mod M, a time spread in it."""

    events: int
    tenants: int
    first_month: datetime
    months: int = MONTHS

    @property
    def bounds(self) -> list[datetime]:
        return month_starts(self.first_month, self.months)

    def draft(self, k: int) -> EventDraft:
        h = (k * 2654435761) % 4294967296
        tenant = k % self.tenants
        month = (k // self.tenants) % self.months
        start, end = self.bounds[month], self.bounds[month + 1]
        seconds = int((end - start).total_seconds())
        kind, unit = TYPES[h % 3]
        attributes: dict[str, str | bool | Decimal] = {
            "region": REGIONS[h % 4],
            "plan": PLANS[(h >> 3) % 3],
            "model": MODELS[(h >> 6) % 5],
            "feature": FEATURES[(h >> 9) % 6],
        }
        if h % 2 == 0:
            attributes["context"] = Decimal(CONTEXTS[(h >> 12) % 5])
        return EventDraft(
            id=f"big-{k:09d}",
            tenant=tenant_id(tenant),
            type=kind,
            quantity=Decimal(h % 4000) / 4,
            time=start + timedelta(seconds=(h >> 4) % seconds, microseconds=h % 1000),
            subject=f"user-{(h >> 2) % 97}",
            unit=unit,
            attributes=attributes,
        )

    def count(self, tenant: int, month: int) -> int:
        """How many events the layout puts in `tenant`'s `month` (all types)."""
        rounds = (self.events - tenant + self.tenants - 1) // self.tenants
        return rounds // self.months + (1 if month < rounds % self.months else 0)


@dataclass(frozen=True)
class BigStore:
    url: str
    keyring: Path
    layout: Layout
    load_seconds: float
    reused: bool
    throwaway: bool


def name_of(events: int, tenants: int) -> str:
    return f"tally_bench_big_{events}_{tenants}_s{schema_version()}_v{LOADER_VERSION}"


def _marker(url: str) -> dict[str, Any] | None:
    try:
        with psycopg.connect(url, connect_timeout=5) as connection:
            row = connection.execute(
                "SELECT events, tenants, first_month, months, load_seconds FROM bench_big_store"
            ).fetchone()
    except psycopg.Error:
        return None
    if row is None:
        return None
    return dict(
        zip(("events", "tenants", "first_month", "months", "load_seconds"), row, strict=True)
    )


def services_of(url: str, keyring: Path) -> Services:
    return build(Settings(database_url=url, keyring=str(keyring), log_level="warning"))


def _load_slice(
    url: str, keyring: str, *, layout: dict[str, Any], start: int, end: int, progress: Any
) -> None:
    """One loader process: seal and append events [start, end) of the layout."""
    plan = Layout(**layout)
    services = services_of(url, Path(keyring))
    try:
        ciphers = services.keys.ciphers_of([tenant_id(n) for n in range(plan.tenants)])
        known: dict[str, set[str]] = {}
        for first in range(start, end, BATCH):
            events: list[NewEvent] = []
            for k in range(first, min(first + BATCH, end)):
                draft = plan.draft(k)
                cipher = ciphers[draft.tenant]
                assert cipher is not None  # noqa: S101 - the loader never shreds
                events.append(
                    seal_event(
                        draft,
                        application=servers.APPLICATION,
                        region=services.settings.region,
                        cipher=cipher,
                        known=known.get(draft.tenant, ()),
                    )
                )
            outcomes = services.store.append(events, received_at=datetime.now(UTC))
            if any(outcome.value != "accepted" for outcome in outcomes):
                raise RuntimeError(f"events {first}.. were not all accepted: {set(outcomes)}")
            for event in events:
                if event.dictionary:
                    known.setdefault(event.tenant, set()).update(t for t, _ in event.dictionary)
            progress.put(len(events))
    finally:
        services.close()


def prepare(url: str, keyring: Path, tenants: int) -> None:
    """Migrate, register the application and the tenants (long lateness windows do not
    matter here: the store takes any time) and make each tenant's data key."""
    services = services_of(url, keyring)
    try:
        services.registry.create_application(ApplicationIn(id=servers.APPLICATION))
        ids = [tenant_id(n) for n in range(tenants)]
        for tenant in ids:
            services.registry.create_tenant(TenantIn(id=tenant))
        for first in range(0, tenants, 500):
            services.keys.ciphers_of(ids[first : first + 500])
    finally:
        services.close()


def load(url: str, keyring: Path, layout: Layout, processes: int, say: Any) -> float:
    """Fill the migrated store at `url` by `processes` loader processes; the seconds taken."""
    began = time.perf_counter()
    prepare(url, keyring, layout.tenants)
    say(
        f"  big store: {layout.tenants:,} tenants registered in {time.perf_counter() - began:.1f} s"
    )
    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    step = -(-layout.events // processes)
    workers = [
        context.Process(
            target=_load_slice,
            args=(url, str(keyring)),
            kwargs={
                "layout": asdict(layout),
                "start": n * step,
                "end": min((n + 1) * step, layout.events),
                "progress": progress,
            },
        )
        for n in range(processes)
        if n * step < layout.events
    ]
    for worker in workers:
        worker.start()
    done, shown = 0, time.perf_counter()
    while done < layout.events:
        try:
            done += progress.get(timeout=1.0)
        except queue.Empty:
            if any(w.exitcode not in (None, 0) for w in workers):
                for w in workers:
                    w.kill()
                raise RuntimeError("a loader process failed; see its output above") from None
            if all(w.exitcode == 0 for w in workers):
                break
        if time.perf_counter() - shown >= 10:
            shown = time.perf_counter()
            rate = done / (shown - began)
            left = (layout.events - done) / rate if rate else 0
            say(
                f"  big store: {done:,}/{layout.events:,} events, {rate:,.0f}/s, ~{left:.0f} s left"
            )
    for worker in workers:
        worker.join()
    if any(worker.exitcode != 0 for worker in workers) or done != layout.events:
        raise RuntimeError(f"loading stopped at {done:,} of {layout.events:,} events")
    vacuum = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM (ANALYZE) events")
        connection.execute("VACUUM (ANALYZE) attribute_values")
    say(f"  big store: VACUUM ANALYZE in {time.perf_counter() - vacuum:.1f} s")
    return time.perf_counter() - began


def _first_month(now: datetime) -> datetime:
    month = now.year * 12 + now.month - 1 - MONTHS  # MONTHS whole months before this one
    return datetime(month // 12, month % 12 + 1, 1, tzinfo=UTC)


def _create(
    url: str, name: str, keyring: Path, layout: Layout, *, processes: int, say: Any
) -> float:
    with psycopg.connect(servers.PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    keyring.parent.mkdir(parents=True, exist_ok=True)
    keyring.unlink(missing_ok=True)
    keyrings.generate(keyring)
    seconds = load(url, keyring, layout, processes, say)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE bench_big_store (events bigint NOT NULL, tenants integer NOT NULL, "
            "first_month timestamptz NOT NULL, months integer NOT NULL, "
            "load_seconds double precision NOT NULL, loaded_at timestamptz NOT NULL)"
        )
        connection.execute(
            "INSERT INTO bench_big_store VALUES (%s, %s, %s, %s, %s, now())",
            (layout.events, layout.tenants, layout.first_month, layout.months, seconds),
        )
    return seconds


def _sessions(name: str) -> int:
    """How many sessions of other clients are connected to database `name`."""
    with psycopg.connect(servers.PG_ADMIN_URL, autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchone()
    return int(row[0]) if row else 0


def ensure(
    events: int, tenants: int, *, processes: int, rebuild: bool, throwaway: bool, say: Any
) -> BigStore:
    """The big store of `events` events over `tenants` tenants: reused when complete, else
    (or with `rebuild`) loaded now. A `throwaway` one has a unique name (drop it with `drop`)."""
    name = name_of(events, tenants)
    if throwaway:
        name = f"bench_big_{multiprocessing.current_process().pid}_{time.time_ns() % 10**8}"
    url = servers.database_url(name)
    keyring = STATE / f"{name}.keyring"
    found = None if rebuild or throwaway else _marker(url)
    if found is not None and keyring.exists() and found["events"] == events:
        layout = Layout(events, tenants, found["first_month"].astimezone(UTC), found["months"])
        say(f"  big store: reusing {name} (loaded in {found['load_seconds']:.0f} s)")
        return BigStore(url, keyring, layout, found["load_seconds"], True, False)
    busy = _sessions(name)
    if busy:
        raise RuntimeError(
            f"{name} is incomplete and {busy} other session(s) use it: another run is loading "
            "it (wait for it to finish; loading it again here would drop that run's work)"
        )
    layout = Layout(events, tenants, _first_month(datetime.now(UTC)))
    say(f"  big store: loading {events:,} events into {name} with {processes} processes ...")
    seconds = _create(url, name, keyring, layout, processes=processes, say=say)
    say(f"  big store: loaded {events:,} events in {seconds:.1f} s ({events / seconds:,.0f}/s)")
    return BigStore(url, keyring, layout, seconds, False, throwaway)


def drop(store: BigStore) -> None:
    name = store.url.rsplit("/", 1)[1]
    with psycopg.connect(servers.PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    store.keyring.unlink(missing_ok=True)


def sample_rows(store: BigStore) -> Iterator[tuple[int, int, int]]:
    """(tenant, month, expected events) for reconciliation checks, all tenant-months."""
    for tenant in range(store.layout.tenants):
        for month in range(store.layout.months):
            yield tenant, month, store.layout.count(tenant, month)
