"""`tally keyring …`, `tally reencrypt` and `tally tenants shred`: encryption at rest.

Master keys live in the keyring (TALLY_KEYRING), tenants' data keys in the store, wrapped by
a master key; see crypto/. Nothing here prints or logs key material.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tally.bootstrap import keyring_spec, open_keyring, open_store, utc_now
from tally.cli.common import (
    CommandError,
    JsonOption,
    command_store,
    emit,
    err,
    out,
    registry,
    settings,
)
from tally.cli.common import table_of as _table
from tally.crypto import keyring as keyrings
from tally.crypto.keyring import Keyring, KeyringError, KeyringSource
from tally.crypto.sealing import SealBroken
from tally.crypto.tenant_keys import TenantKeys
from tally.registry.audit import Actor
from tally.services.usage import backfill_tokens
from tally.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Make and rotate the master keys (TALLY_KEYRING).")


@contextmanager
def keyring_errors() -> Iterator[None]:
    """A keyring problem is a CommandError with exit code 2, never a traceback."""
    try:
        yield
    except (KeyringError, SealBroken) as error:
        raise CommandError("keyring", str(error), exit_code=2) from None


def configured_keyring(configured: Settings | None = None) -> tuple[str, Keyring]:
    """The keyring of `configured` (default: the command's settings): its spec and keys."""
    with keyring_errors():
        spec = keyring_spec(configured or settings())
        return spec, keyrings.load(spec)


@app.command("generate")
def generate(
    out_path: Annotated[
        Path | None,
        typer.Option("--out", help="File to write (default: TALLY_KEYRING, or beside SQLite)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a new keyring with one master key (owner-only; never overwrites a file)."""
    with keyring_errors():
        target = out_path or Path(keyring_spec(settings()))
        keyring = keyrings.generate(target)
    data = {"path": str(target), "newest": keyring.newest.id}
    emit(
        data,
        as_json=as_json,
        text=f"Keyring {target} written (master key {keyring.newest.id}). Set "
        f"TALLY_KEYRING={target}, and keep a copy apart from the database and its backups.",
    )


@app.command("rotate")
def rotate(as_json: JsonOption = False) -> None:
    """Add a new newest master key to the keyring file. New data keys are wrapped with it
    (running servers re-read the keyring); run 'tally reencrypt' to move the existing ones."""
    with keyring_errors():
        spec = keyring_spec(settings())
        rotated = keyrings.rotate(spec)
    with command_store() as store:
        store.record_audit(
            Actor.cli().entry(
                "keyring.rotate",
                at=utc_now(),
                target=rotated.newest.id,
                details={"keys": [key.id for key in rotated.keys]},
            )
        )
    emit(
        {"path": spec, "newest": rotated.newest.id, "keys": [key.id for key in rotated.keys]},
        as_json=as_json,
        text=f"Master key {rotated.newest.id} added to {spec}; running servers pick it up within "
        "a second. Run 'tally reencrypt' next, and keep the older keys until 'tally keyring "
        "status' shows them unused.",
    )


@app.command("status")
def status(as_json: JsonOption = False) -> None:
    """The keyring's master keys (ids only) and how many data keys each wraps."""
    _, keyring = configured_keyring()
    with command_store() as store:
        usage = store.data_key_usage()
    rows = [
        {"id": key.id, "newest": key is keyring.newest, "data_keys": usage.pop(key.id, 0)}
        for key in keyring.keys
    ]
    rows += [
        {"id": key_id, "newest": False, "data_keys": n, "missing": True}
        for key_id, n in usage.items()
    ]
    emit(rows, as_json=as_json, table=_table(rows, ["id", "newest", "data_keys", "missing"]))
    if any(row.get("missing") for row in rows):
        raise typer.Exit(1)


def reencrypt(
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="Data keys per round.")] = 200,
    as_json: JsonOption = False,
) -> None:
    """Move every tenant data key to the newest master key: online (servers keep running),
    resumable (run it again after an interruption), with a progress bar."""
    spec, keyring = configured_keyring()
    actor = Actor.cli()
    with command_store() as store, keyring_errors():
        keys = TenantKeys(store=store, keyring=KeyringSource(spec, keyring), clock=utc_now)
        keys.verify()
        total = sum(keys.pending().values())
        moved = 0
        with Progress(
            TextColumn("Re-wrapping data keys"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=as_json,
        ) as progress:
            task = progress.add_task("rewrap", total=total)
            while step := keys.rewrap(
                limit=batch,
                audit=lambda n: actor.entry(
                    "keyring.reencrypt",
                    at=utc_now(),
                    target=keyring.newest.id,
                    details={"data_keys": n},
                ),
            ):
                moved += step
                progress.update(task, advance=step, total=max(total, moved))
        left = sum(keys.pending().values())
    emit(
        {"newest": keyring.newest.id, "moved": moved, "left": left},
        as_json=as_json,
        text=f"{moved} data keys moved to master key {keyring.newest.id}; {left} left.",
    )


def reindex(
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="Events per round.")] = 1000,
    as_json: JsonOption = False,
) -> None:
    """Give the events stored before attribute tokens existed (migration 0006) their tokens,
    so that usage can group them by attribute: online, resumable, each event opened once. On
    PostgreSQL it runs as the owner role (TALLY_OWNER_DATABASE_URL): the service role may
    never update an event."""
    spec, keyring = configured_keyring()
    configured = settings()
    owner = configured.owner_database_url
    if configured.sqlite_path is None and owner is not None:
        configured = configured.model_copy(update={"database_url": owner})
    with closing(open_store(configured)) as store, keyring_errors():
        keys = TenantKeys(store=store, keyring=KeyringSource(spec, keyring), clock=utc_now)
        keys.verify()
        filled = 0
        with Progress(
            TextColumn("Tokenising attributes"),
            TextColumn("{task.completed} events"),
            TimeElapsedColumn(),
            console=err,
            disable=as_json,
        ) as progress:
            task = progress.add_task("reindex", total=None)
            for step in backfill_tokens(store, keys, batch=batch):
                filled += step
                progress.update(task, advance=step)
    emit({"filled": filled}, as_json=as_json, text=f"{filled} events given attribute tokens.")


def shred(
    tenant_id: Annotated[str, typer.Argument(metavar="ID")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Destroy a tenant's data key: its attributes become unreadable everywhere, for good;
    its events keep their ids, times and quantities, and it takes no more events."""
    if not yes and as_json:
        # A script cannot answer, and the question would mix with the JSON on stdout.
        raise CommandError("usage", "Shredding with --json needs --yes.", exit_code=2)
    if not yes:
        typer.confirm(
            f"Shred tenant {tenant_id}? Its attributes can never be read again", abort=True
        )
    with command_store() as store:
        registry(store).shred_tenant(tenant_id, actor=Actor.cli())
    emit(
        {"id": tenant_id, "shredded": True},
        as_json=as_json,
        text=f"Tenant {tenant_id} shredded: its data key is destroyed.",
    )


def announce_new_keyring(as_json: bool) -> None:
    """For `tally serve`: open (on a fresh SQLite store, make) the keyring and check it
    against the store before any worker starts; say so when one was made."""
    with keyring_errors():
        configured = settings()
        spec = keyring_spec(configured)
        with command_store() as store:
            keyring, created = open_keyring(configured, store)
            TenantKeys(store=store, keyring=KeyringSource(spec, keyring), clock=utc_now).verify()
    if created is not None and not as_json:
        out.print(
            f"Created keyring {created} (owner-only) for this store's master key. Back it up "
            "apart from the database: without it no attribute can be read."
        )
