"""`tally backup --out FILE`, `tally backup verify FILE`, `tally restore FILE`: logical backups.

A backup is one consistent snapshot of every table, taken while the store serves, encrypted
with a key of its own that the keyring wraps; see backup/ and docs/operations.md, "Backup and
restore". Nothing here prints key material or attribute values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from tally.backup import service
from tally.backup.fileformat import BackupDamaged, WrongKeyring
from tally.backup.manifest import Manifest
from tally.backup.schema import Unsupported
from tally.backup.service import ManifestMismatch, NotEmpty, Target
from tally.bootstrap import open_store, utc_now
from tally.cli.common import CommandError, JsonOption, emit, err, out, settings, table_of
from tally.cli.crypto import configured_keyring
from tally.crypto.sealing import SealBroken
from tally.registry.audit import Actor
from tally.store import migrate as migrations

# verify prints at most this many (tenant, type, month) rows as a table.
SHOWN_PERIODS = 50

app = typer.Typer(
    help="Take a logical backup (--out FILE), or check one (verify FILE).",
    invoke_without_command=True,
)

KeyringOption = Annotated[
    str | None,
    typer.Option(
        "--keyring",
        help="The keyring: a file, or command:PROGRAM (default: TALLY_KEYRING, or beside SQLite).",
    ),
]


@contextmanager
def backup_errors() -> Iterator[None]:
    """What can go wrong with a backup file, as a CommandError saying what and where."""
    try:
        yield
    except WrongKeyring as error:
        raise CommandError("keyring", str(error), exit_code=2) from None
    except BackupDamaged as error:
        raise CommandError("backup-damaged", str(error)) from None
    except ManifestMismatch as error:
        raise CommandError("manifest-mismatch", error.what, details=error.lines) from None
    except Unsupported as error:
        raise CommandError("unsupported", str(error)) from None
    except NotEmpty as error:
        raise CommandError("not-empty", str(error)) from None
    except SealBroken as error:
        raise CommandError("keyring", str(error), exit_code=2) from None
    except FileNotFoundError as error:
        raise CommandError("not-found", f"There is no file {error.filename}.") from None
    except OSError as error:
        raise CommandError("failed", f"{error.filename or 'The file'}: {error.strerror}.") from None


@contextmanager
def _progress(label: str, *, rows: bool, quiet: bool) -> Iterator[Callable[..., Any]]:
    """A progress bar on stderr when it is a terminal (and not --json); silent otherwise.
    Yields `update(completed, total=None)`."""
    counter = MofNCompleteColumn() if rows else DownloadColumn()
    with Progress(
        TextColumn(label),
        BarColumn(),
        counter,
        TimeElapsedColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(completed: int, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.update(task, completed=completed)

        yield update


@app.callback()
def backup(
    ctx: typer.Context,
    out_path: Annotated[
        Path | None,
        typer.Option("--out", help="The backup file to write (replaced only once complete)."),
    ] = None,
    keyring: KeyringOption = None,
    as_json: JsonOption = False,
) -> None:
    """Back up every table of the configured store to FILE: one consistent snapshot taken
    while the store serves, encrypted with a new key wrapped by the keyring's newest master
    key, with a manifest of row counts and per-tenant monthly figures."""
    if ctx.invoked_subcommand is not None:
        return
    if out_path is None:
        raise CommandError("usage", "Name the backup file: tally backup --out FILE.", exit_code=2)
    configured = settings(**({"keyring": keyring} if keyring else {}))
    _, ring = configured_keyring(configured)
    with closing(open_store(configured)) as store, backup_errors():
        with _progress("Backing up", rows=True, quiet=as_json) as update:
            manifest = service.take(
                store,
                out_path,
                keyring=ring,
                now=utc_now(),
                on_start=lambda total: update(0, total),
                progress=update,
            )
        store.record_audit(
            Actor.cli().entry(
                "backup.create",
                at=utc_now(),
                target=manifest.backup_id,
                details={"rows": sum(manifest.figures.tables.values())},
            )
        )
    emit(
        {"file": str(out_path), **summary(manifest)},
        as_json=as_json,
        text=f"Backup {manifest.backup_id} written to {out_path}: {_totals(manifest)}.",
    )


@app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The backup file.")],
    keyring: KeyringOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check every chunk of a backup and that its rows add up to its manifest, without a
    store (only the keyring); print the manifest's summary. Exit 1 naming what is wrong."""
    _, ring = configured_keyring(settings(**({"keyring": keyring} if keyring else {})))
    size = _size(file)
    with backup_errors(), _progress("Verifying", rows=False, quiet=as_json) as update:
        update(0, size)
        manifest = service.read(file, ring, progress=update)
    if as_json:
        emit({"file": str(file), "valid": True, **summary(manifest)}, as_json=True)
        return
    _print_summary(manifest)
    out.print(f"Backup {manifest.backup_id} is intact: {_totals(manifest)}.")


def restore(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The backup file.")],
    keyring: KeyringOption = None,
    as_json: JsonOption = False,
) -> None:
    """Restore a backup into the configured store, which must be empty (it is migrated
    first): SQLite or PostgreSQL, whichever the backup came from. One transaction, checked
    against the manifest before it commits; a failed restore leaves the store empty."""
    configured = settings(**({"keyring": keyring} if keyring else {}))
    spec, ring = configured_keyring(configured)
    path = configured.sqlite_path
    target = Target(
        sqlite_path=path,
        url=None if path else configured.owner_database_url or configured.database_url,
    )
    known = migrations.known("sqlite" if path else "postgresql")
    with backup_errors(), _progress("Restoring", rows=False, quiet=as_json) as update:
        update(0, _size(file))
        restored = service.restore(
            file,
            target,
            keyring=ring,
            known_migrations=known,
            open_store=lambda: open_store(configured, migrate=True),
            # backup.restore and the new epoch's log.epoch_renew, both of this backup.
            audit=lambda action, manifest: Actor.cli().entry(
                action,
                at=utc_now(),
                target=manifest.backup_id,
                details={"created_at": manifest.origin.created_at, "store": manifest.origin.store},
            ),
            progress=update,
        )
    manifest = restored.manifest
    epoch_id = restored.epoch.id.hex()
    if as_json:
        emit(
            {"file": str(file), "restored": True, **summary(manifest), "new_log_epoch": epoch_id},
            as_json=True,
        )
        return
    taken = manifest.origin.created_at
    out.print(f"Restored backup {manifest.backup_id} (taken {taken}): {_totals(manifest)}.")
    if path is not None and configured.keyring is None:
        out.print(f"Serve this store with TALLY_KEYRING={spec}: its data keys need that keyring.")
    out.print(
        f"The export log is in a new epoch ({epoch_id}): a billing system's cursor that had "
        "read past this backup is refused (409 log-rewound) with a resume_cursor, one behind "
        "it goes on as it is; see docs/operations.md, 'Backup and restore'."
    )


def _size(file: Path) -> int:
    with backup_errors():
        return file.stat().st_size


def summary(manifest: Manifest) -> dict[str, Any]:
    """The manifest for people and scripts: everything but the per-period digests' detail."""
    figures = manifest.figures
    return {
        "backup_id": manifest.backup_id,
        "created_at": manifest.origin.created_at,
        "tally_version": manifest.origin.tally_version,
        "store": manifest.origin.store,
        "schema_version": manifest.origin.schema_version,
        "tables": figures.tables,
        "periods": [
            {
                "tenant": p.tenant,
                "type": p.type,
                "period_start": p.period_start,
                "count": p.count,
                "sum": p.sum,
                "cancelled_count": p.cancelled_count,
                "cancelled_sum": p.cancelled_sum,
                "digest": p.digest,
            }
            for p in figures.periods
        ],
        "high_water_marks": figures.high_water_marks,
        "log_epoch": figures.log_epoch,
    }


def _totals(manifest: Manifest) -> str:
    tables = manifest.figures.tables
    return (
        f"{sum(tables.values())} rows in {len(tables)} tables, {tables.get('events', 0)} events, "
        f"{tables.get('cancellations', 0)} cancellations, {tables.get('tenants', 0)} tenants"
    )


def _print_summary(manifest: Manifest) -> None:
    figures = manifest.figures
    out.print(f"backup          {manifest.backup_id}")
    out.print(f"taken           {manifest.origin.created_at}")
    out.print(
        f"from            {manifest.origin.store} store, Tally {manifest.origin.tally_version}"
    )
    out.print(f"schema          {manifest.origin.schema_version}")
    out.print(f"log epoch       {figures.log_epoch or '-'}")
    out.print(f"high-water      {', '.join(str(n) for n in figures.high_water_marks)}")
    out.print("rows            " + ", ".join(f"{t} {n}" for t, n in figures.tables.items()))
    out.print(f"periods         {len(figures.periods)} (tenant, type, month in UTC)")
    if len(figures.periods) > SHOWN_PERIODS:
        out.print(f"                (the first {SHOWN_PERIODS}; --json prints them all)")
    rows = [
        {
            "tenant": p.tenant,
            "type": p.type,
            "month": p.period_start[:7],
            "count": p.count,
            "sum": p.sum,
            "cancelled": f"{p.cancelled_count} ({p.cancelled_sum})",
        }
        for p in figures.periods[:SHOWN_PERIODS]
    ]
    if rows:
        out.print(table_of(rows, ["tenant", "type", "month", "count", "sum", "cancelled"])())
