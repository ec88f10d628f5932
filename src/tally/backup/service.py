"""Take, verify and restore logical backups (`tally backup`, `tally backup verify`,
`tally restore`; docs/operations.md, "Backup and restore").

The file (backup/fileformat.py) holds a stream of JSON lines:

    {"backup": {backup_id, created_at, tally_version, store, schema_version, migrations}}
    then per table, in foreign-key order (backup/schema.py):
    {"table": NAME, "columns": [[column, kind], ...], "cancelled": BOOL}
    [value, ...]                       one line per row, in the table's key order (with
                                       "cancelled", events carry one more value: whether the
                                       event is cancelled in the snapshot)
    {"end": NAME, "rows": N}
    {"manifest": {...}}                backup/manifest.py

Everything is read from one snapshot of the store (store/snapshot.py) and streamed: memory stays
bounded by a chunk, a batch of rows and one accumulator per tenant, type and month.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from tally.backup import fileformat, schema
from tally.backup.fileformat import BackupDamaged, Header
from tally.backup.manifest import (
    Book,
    DataKeys,
    Figures,
    Manifest,
    Origin,
    Period,
    differences,
    from_database,
)
from tally.backup.schema import TABLES, Unsupported
from tally.crypto.keyring import Keyring
from tally.crypto.sealing import SealBroken
from tally.events.log import LogEpoch
from tally.events.model import format_time
from tally.files import replacing
from tally.registry.audit import EPOCH_RENEWED, AuditEntry
from tally.store import snapshot
from tally.store.interface import EventStore
from tally.store.snapshot import Column, Kind, Row, Snapshot

BATCH = 1000  # rows per insert on restore
# The tables whose rows the figures are made of (the others are only counted).
_FIGURED = ("tenant_keys", "log_partitions", "log_epochs", "events", "cancellations")


class ManifestMismatch(Exception):
    """What the rows add up to is not what the manifest says (or, after a restore, what the
    restored store holds is not). The message lists the differences."""

    def __init__(self, what: str, lines: Sequence[str]) -> None:
        super().__init__(f"{what}: " + "; ".join(lines))
        self.what = what
        self.lines = list(lines)


class NotEmpty(Exception):
    """The store a restore was given holds data already. Nothing was changed."""


Progress = Callable[[int], None]
"""Told how far the work has got: rows written (backup), bytes read (verify, restore)."""


def _nothing(_: int) -> None:
    return None


# --- watching rows go by ------------------------------------------------------------------


@dataclass
class _Observer:
    """Adds up the rows of a backup as they pass, whichever way they go (from a store to a
    file, from a file to a store, from a restored store for its check)."""

    keyring: Keyring
    keys: DataKeys = field(init=False)
    book: Book = field(init=False)
    tables: dict[str, int] = field(default_factory=dict)
    marks: dict[int, int] = field(default_factory=dict)
    epoch: tuple[int, str] | None = None  # the latest (seq, epoch id in hex)

    def __post_init__(self) -> None:
        self.keys = DataKeys(self.keyring)
        self.book = Book(self.keys)

    def begin(
        self, table: str, columns: Sequence[Column], cancelled: bool
    ) -> Callable[[Row], None]:
        """What to do with each row of `table` (a row of `columns`, and the cancelled flag)."""
        at = {name: n for n, (name, _) in enumerate(columns)}
        self.tables[table] = 0
        if table == "tenant_keys":

            def key(row: Row) -> None:
                wrapped = row[at["wrapped"]]
                self.keys.add(
                    str(row[at["tenant"]]),
                    None if row[at["master_key_id"]] is None else str(row[at["master_key_id"]]),
                    None if wrapped is None else base64.b64decode(str(wrapped)),
                )

            return key
        if table == "log_partitions":
            return lambda row: self.marks.__setitem__(
                int(row[at["partition"]] or 0), int(row[at["last_offset"]] or 0)
            )
        if table == "log_epochs":

            def epoch(row: Row) -> None:
                seq = int(row[at["seq"]] or 0)
                if self.epoch is None or seq > self.epoch[0]:
                    self.epoch = (seq, base64.b64decode(str(row[at["epoch"]])).hex())

            return epoch
        if table == "events":
            self.book.events(columns)
            if cancelled:
                return lambda row: self.book.add_event(row[:-1], bool(row[-1]))
            return lambda row: self.book.add_event(row, False)
        if table == "cancellations":
            return lambda row: self.book.add_cancellation(row[at["application"]], row[at["id"]])
        return _ignore

    def figures(self, counts: Mapping[str, int] | None = None) -> Figures:
        flagged, digest = self.book.cancelled
        return Figures(
            tables=dict(counts if counts is not None else self.tables),
            periods=self.book.periods(),
            high_water_marks=[self.marks[p] for p in sorted(self.marks)],
            log_epoch=None if self.epoch is None else self.epoch[1],
            cancelled_events=flagged,
            cancelled_digest=digest,
        )


def _ignore(_: Row) -> None:
    return None


def _walk(
    snap: Snapshot,
    tables: Sequence[str],
    columns: Mapping[str, list[Column]],
    observer: _Observer,
    *,
    sink: Callable[[str, list[Column], bool, Iterator[Row]], None] | None = None,
) -> None:
    """Stream each of `tables` from `snap` through `observer` (and through `sink`, which
    consumes them)."""
    for table in tables:
        cancelled = table == "events" and "cancellations" in columns
        rows = _watched(snap, table, columns[table], cancelled, observer)
        if sink is None:
            for _ in rows:
                pass
        else:
            sink(table, columns[table], cancelled, rows)


def _watched(
    snap: Snapshot, table: str, columns: list[Column], cancelled: bool, observer: _Observer
) -> Iterator[Row]:
    watch = observer.begin(table, columns, cancelled)
    for row in snap.rows(table, columns, order_by=TABLES[table].order_by, cancelled=cancelled):
        watch(row)
        observer.tables[table] += 1
        yield row


def _measure(snap: Snapshot, keyring: Keyring, columns: Mapping[str, list[Column]]) -> Figures:
    """The figures of a store as it is in `snap`: counts of every table, the database's own
    aggregates of the events, the digests from its rows. Raises ManifestMismatch if the rows
    and the aggregates disagree (which one snapshot rules out), SealBroken if attributes do
    not open."""
    observer = _Observer(keyring)
    _walk(snap, [t for t in _FIGURED if t in columns], columns, observer)
    counts = {table: snap.count(table) for table in columns}
    found = observer.figures(counts)
    if "events" in columns:
        _agree(found, counts, from_database(snap.month_figures()), "store")
    return found


def _agree(found: Figures, counts: Mapping[str, int], periods: list[Period], what: str) -> None:
    """Raises ManifestMismatch unless the rows read (`found`) add up to the database's own
    `counts` and aggregated `periods` (one snapshot: they always should)."""
    lines = differences(replace(found, tables=dict(counts), periods=periods), found, digests=False)
    if lines:
        raise ManifestMismatch(f"The {what}'s rows disagree with its own aggregates", lines)


# --- backup -------------------------------------------------------------------------------


class _Lines:
    """JSON lines into the encrypted stream."""

    def __init__(self, writer: fileformat.Writer) -> None:
        self._writer = writer
        self._buffer: list[str] = []
        self._size = 0

    def put(self, record: object) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= 64 * 1024:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._writer.write(("\n".join(self._buffer) + "\n").encode())
            self._buffer.clear()
            self._size = 0


def new_backup_id(now: datetime) -> str:
    return f"bk-{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


def take(
    store: EventStore,
    out: Path,
    *,
    keyring: Keyring,
    now: datetime,
    on_start: Callable[[int], None] = _nothing,
    progress: Progress = _nothing,
    chunk_bytes: int = fileformat.CHUNK_BYTES,
) -> Manifest:
    """Write a backup of `store` to `out`: one snapshot, streamed, encrypted in chunks of
    `chunk_bytes` of plaintext. `on_start` hears how many rows there are, `progress` how many
    are written so far.

    `out` appears only once it is complete (written beside it, fsynced, renamed); a failure
    leaves what was there before. Raises Unsupported for a table or column this version does
    not carry, StoreUnavailable, SealBroken when an event's attributes do not open with the
    keyring (altered, or a master key missing from it), OSError.
    """
    backup_id = new_backup_id(now)
    with snapshot.reading(store) as snap:
        columns = schema.carried(snap.tables())
        order = schema.ordered(list(columns), snap.foreign_keys())
        migrations = snap.migrations()
        origin = Origin(
            backup_id=backup_id,
            created_at=format_time(now),
            tally_version=metadata.version("tally"),
            store=snap.kind,
            schema_version=migrations[-1] if migrations else None,
            migrations=migrations,
        )
        counts = {table: snap.count(table) for table in order}
        on_start(sum(counts.values()))
        database = from_database(snap.month_figures()) if "events" in columns else []
        observer = _Observer(keyring)
        with replacing(out) as file:
            writer = fileformat.Writer(
                file,
                keyring=keyring,
                backup_id=backup_id,
                created_at=origin.created_at,
                chunk_bytes=chunk_bytes,
            )
            lines = _Lines(writer)
            lines.put({"backup": origin.to_json()})
            written = 0

            def sink(table: str, found: list[Column], cancelled: bool, rows: Iterator[Row]) -> None:
                nonlocal written
                lines.put({"table": table, "columns": found, "cancelled": cancelled})
                count = 0
                for row in rows:
                    lines.put(row)
                    count += 1
                    if count % BATCH == 0:
                        progress(written + count)
                written += count
                progress(written)
                lines.put({"end": table, "rows": count})

            _walk(snap, order, columns, observer, sink=sink)
            figures = observer.figures()
            _agree(figures, counts, database, "snapshot")
            manifest = Manifest(origin=origin, figures=figures)
            lines.put({"manifest": manifest.to_json()})
            lines.flush()
            writer.close()
    return manifest


# --- reading a backup ----------------------------------------------------------------------


def _records(
    file: BinaryIO, header: Header, digest: bytes, key: bytes, progress: Progress
) -> Iterator[tuple[int, Any]]:
    """The JSON records of the plaintext stream, each with the chunk it ends in."""
    pending = b""
    for index, plaintext in fileformat.chunks(file, header, digest, key):
        progress(file.tell())
        lines = (pending + plaintext).split(b"\n")
        pending = lines.pop()
        for line in lines:
            try:
                yield index, json.loads(line)
            except ValueError:
                raise BackupDamaged(
                    f"The backup is damaged: chunk {index} holds a line that is not JSON."
                ) from None
    if pending:
        raise BackupDamaged("The backup is damaged: its content ends in the middle of a line.")


OnTable = Callable[[str, list[Column]], None]
OnRows = Callable[[str, list[Column], list[Row]], None]


@dataclass(frozen=True, slots=True)
class Opened:
    """A backup whose header, key and first record were read: enough to decide whether to
    restore it, before anything is changed."""

    header: Header
    origin: Origin


def _open(
    file: BinaryIO, keyring: Keyring, progress: Progress
) -> tuple[Opened, Iterator[tuple[int, Any]]]:
    header, digest = fileformat.read_header(file)
    key = fileformat.backup_key(header, keyring)
    records = _records(file, header, digest, key, progress)
    first = next(records, None)
    try:
        assert first is not None  # noqa: S101 - turned into BackupDamaged below
        origin = Origin.from_json(first[1]["backup"])
    except (AssertionError, KeyError, TypeError, ValueError):
        raise BackupDamaged("The backup's content does not start as a Tally backup's.") from None
    if origin.backup_id != header.backup_id:
        raise BackupDamaged("The backup's content belongs to another backup than its header.")
    return Opened(header, origin), records


def peek(path: Path, keyring: Keyring) -> Opened:
    """The header and first record of the backup at `path`. Raises BackupDamaged,
    WrongKeyring, OSError."""
    with path.open("rb") as file:
        opened, _ = _open(file, keyring, _nothing)
    return opened


def read(
    path: Path,
    keyring: Keyring,
    *,
    on_table: OnTable | None = None,
    on_rows: OnRows | None = None,
    progress: Progress = _nothing,
) -> Manifest:
    """Read the backup at `path` through, checking every chunk, its structure, and that its
    rows add up to its manifest (row counts, per-month counts, sums and digests, high-water
    marks, cancellations), which it returns. `on_table` hears of each table as it begins,
    `on_rows` gets its rows in batches (without the events' cancelled flag).

    Raises BackupDamaged (naming the chunk, a cut, or what is out of place), WrongKeyring,
    ManifestMismatch (listing the differences), Unsupported (a table or column this version
    does not know), SealBroken (attributes that do not open), OSError; and whatever the
    callbacks raise.
    """
    with path.open("rb") as file:
        opened, records = _open(file, keyring, progress)
        observer = _Observer(keyring)
        manifest: Manifest | None = None
        table: str | None = None
        columns: list[Column] = []
        width = 0
        watch: Callable[[Row], None] = _ignore
        batch: list[Row] = []
        cancelled = False
        for index, record in records:
            if manifest is not None:
                raise BackupDamaged(
                    f"The backup is damaged: chunk {index} holds data after its manifest."
                )
            if isinstance(record, list):
                if table is None or len(record) != width:
                    raise BackupDamaged(
                        f"The backup is damaged: chunk {index} holds a row out of place."
                    )
                watch(record)
                observer.tables[table] += 1
                if on_rows is not None:
                    batch.append(record[:-1] if cancelled else record)
                    if len(batch) >= BATCH:
                        on_rows(table, columns, batch)
                        batch = []
                continue
            if not isinstance(record, dict):
                raise BackupDamaged(
                    f"The backup is damaged: chunk {index} holds a record out of place."
                )
            if "table" in record and table is None:
                table, columns, cancelled = _table_start(record, observer, index)
                width = len(columns) + cancelled
                watch = observer.begin(table, columns, cancelled)
                if on_table is not None:
                    on_table(table, columns)
            elif table is not None and record.get("end") == table:
                if batch and on_rows is not None:
                    on_rows(table, columns, batch)
                batch = []
                if record.get("rows") != observer.tables[table]:
                    raise BackupDamaged(f"The backup is damaged: table {table} lacks rows.")
                table, watch = None, _ignore
            elif "manifest" in record and table is None:
                manifest = _manifest(record["manifest"], index)
            else:
                raise BackupDamaged(
                    f"The backup is damaged: chunk {index} holds a record out of place."
                )
    if manifest is None:
        raise BackupDamaged("The backup is damaged: it has no manifest.")
    _check(manifest, opened, observer)
    return manifest


def _table_start(
    record: Mapping[str, Any], observer: _Observer, index: int
) -> tuple[str, list[Column], bool]:
    name = record["table"]
    if not isinstance(name, str) or name in observer.tables:
        raise BackupDamaged(f"The backup is damaged: chunk {index} repeats or misnames a table.")
    try:
        columns = [(str(column), Kind(kind)) for column, kind in record["columns"]]
    except (KeyError, TypeError, ValueError):
        raise BackupDamaged(
            f"The backup is damaged: chunk {index} misstates table {name}'s columns."
        ) from None
    known = TABLES.get(name)
    strays = [c for c, k in columns if known is None or known.columns.get(c) is not k]
    if known is None or strays:
        what = f"table {name}" if known is None else f"columns {', '.join(strays)} of {name}"
        raise Unsupported(
            f"The backup holds {what}, which this version of Tally does not know: restore it "
            "with the Tally version that took it, or a newer one."
        )
    return name, columns, bool(record.get("cancelled"))


def _manifest(document: Any, index: int) -> Manifest:
    try:
        return Manifest.from_json(document)
    except (KeyError, TypeError, ValueError):
        raise BackupDamaged(
            f"The backup is damaged: chunk {index} holds no readable manifest."
        ) from None


def _check(manifest: Manifest, opened: Opened, observer: _Observer) -> None:
    if manifest.origin != opened.origin:
        raise BackupDamaged("The backup is damaged: its manifest and its first record disagree.")
    lines = differences(manifest.figures, observer.figures())
    rows = observer.book.cancellation_rows
    if rows != observer.book.cancelled:
        lines.append(
            f"cancellations: {rows[0]} rows, but {observer.book.cancelled[0]} events flagged "
            "cancelled (or other ones)"
        )
    if lines:
        raise ManifestMismatch("The backup's rows do not match its manifest", lines)


# --- restore ------------------------------------------------------------------------------


def refuse_unless_empty(snap: Snapshot) -> None:
    """Raises NotEmpty naming what `snap`'s store holds, unless it holds nothing a restore
    would have to overwrite (tables the migrations seed, the cursor secret and yoyo's own
    are replaced)."""
    held = []
    for table in schema.ordered(list(snap.tables()), set()):
        if table in TABLES and TABLES[table].replaced:
            continue
        count = snap.count(table)
        if count:
            held.append(f"{count} row{'s' if count > 1 else ''} in {table}")
    if held:
        raise NotEmpty(
            f"The target store is not empty ({', '.join(held)}): a restore goes only into a new, "
            "empty store. Nothing was changed."
        )


@dataclass(frozen=True, slots=True)
class Target:
    """Where a restore goes: an SQLite file, or a PostgreSQL database through the owner's
    URL (the restore writes what the service role may not)."""

    sqlite_path: Path | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class Restored:
    manifest: Manifest
    epoch: LogEpoch  # the epoch the log is in from now on


def restore(
    path: Path,
    target: Target,
    *,
    keyring: Keyring,
    known_migrations: Sequence[str],
    open_store: Callable[[], EventStore],
    audit: Callable[[str, Manifest], AuditEntry],
    progress: Progress = _nothing,
) -> Restored:
    """Restore the backup at `path` into the empty store `target`, in one transaction.

    First, changing nothing: the header, the keyring, the schema and the target's emptiness
    are checked. Then `open_store` migrates the target (and opens it), and one transaction
    inserts every row in foreign-key order, checks the whole file against its manifest, moves
    sequences past the restored rows, checks the restored store's own counts, sums, digests
    and high-water marks against the manifest, records `audit("backup.restore", manifest)`,
    starts a new epoch of the export log at the backup's high-water marks (recorded as
    `audit(EPOCH_RENEWED, manifest)`), and commits. Any failure rolls it all back: the target holds
    nothing of the backup. The epoch goes in with the rows, never after them: a billing
    system's cursor that had read past the backup is refused with where to resume instead of
    skipping what follows (one behind the backup's high-water marks goes on as it is), even
    when the restore is killed the moment it commits.

    Raises BackupDamaged, WrongKeyring, Unsupported (a backup from a newer schema), NotEmpty,
    ManifestMismatch, SealBroken, StoreUnavailable, OSError.
    """
    opened = peek(path, keyring)
    newer = [m for m in opened.origin.migrations if m not in known_migrations]
    if newer:
        raise Unsupported(
            f"The backup comes from a newer schema (migration {newer[-1]}) than this version of "
            "Tally knows: restore it with the Tally version that took it, or a newer one. "
            "Nothing was changed."
        )
    with snapshot.inspecting(sqlite_path=target.sqlite_path, url=target.url) as look:
        refuse_unless_empty(look)
    open_store().close()  # migrated: whatever the backup's schema, the target's has epochs
    return _load(path, target, keyring=keyring, audit=audit, progress=progress)


def _load(
    path: Path,
    target: Target,
    *,
    keyring: Keyring,
    audit: Callable[[str, Manifest], AuditEntry],
    progress: Progress,
) -> Restored:
    """The transaction of `restore`."""
    with snapshot.loading(sqlite_path=target.sqlite_path, url=target.url) as session:
        refuse_unless_empty(session)
        present = schema.carried(session.tables())
        references = session.foreign_keys()
        restored: list[str] = []

        def on_table(table: str, columns: list[Column]) -> None:
            missing = [c for c, _ in columns if c not in dict(present.get(table, []))]
            if table not in present or missing:
                raise Unsupported(
                    f"The target store lacks table {table} or its columns {missing}: migrate it "
                    "with this version of Tally."
                )
            parents = [p for child, p in references if child == table and p != table]
            if any(parent in present and parent not in restored for parent in parents):
                raise BackupDamaged(
                    f"The backup is damaged: table {table} comes before a table it references."
                )
            restored.append(table)
            if TABLES[table].replaced:
                session.clear(table)

        def on_rows(table: str, columns: list[Column], rows: list[Row]) -> None:
            session.insert(table, columns, rows)

        manifest = read(path, keyring, on_table=on_table, on_rows=on_rows, progress=progress)
        session.continue_sequences()
        found = _measure(session, keyring, {t: present[t] for t in restored})
        lines = differences(manifest.figures, found)
        if lines:
            raise ManifestMismatch("The restored store does not match the backup's manifest", lines)
        _insert(session, present, "audit_log", _audit_row(audit("backup.restore", manifest)))
        renewed = audit(EPOCH_RENEWED, manifest)
        epoch = LogEpoch(
            seq=session.largest("log_epochs", "seq") + 1,
            id=secrets.token_bytes(16),
            started_at=renewed.at,
            reason=f"restored from backup {manifest.backup_id}",
            base=list(manifest.figures.high_water_marks),
        )
        _insert(session, present, "log_epochs", _epoch_row(epoch))
        _insert(session, present, "audit_log", _audit_row(renewed))
    return Restored(manifest, epoch)


def _insert(
    session: Snapshot, present: Mapping[str, list[Column]], table: str, values: Mapping[str, Any]
) -> None:
    """One row of `values` (neutral, by column name) into `table`; columns it leaves out
    take their defaults (the audit log's `seq`)."""
    columns = [(name, kind) for name, kind in present[table] if name in values]
    session.insert(table, columns, [[values[name] for name, _ in columns]])


def _audit_row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "at": format_time(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "details": json.dumps(entry.details, sort_keys=True),
        "source": entry.source,
        "request_id": entry.request_id,
    }


def _epoch_row(epoch: LogEpoch) -> dict[str, Any]:
    return {
        "seq": epoch.seq,
        "epoch": base64.b64encode(epoch.id).decode(),
        "started_at": format_time(epoch.started_at),
        "reason": epoch.reason,
        "base": json.dumps(epoch.base),
    }


__all__ = [
    "BackupDamaged",
    "ManifestMismatch",
    "NotEmpty",
    "SealBroken",
    "Unsupported",
]
