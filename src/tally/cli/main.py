"""`tally`: serve, migrate, and register tenants, applications and keys.

Every command takes `--json` for scripts. Commands talk to the store named by
TALLY_DATABASE_URL directly, through the same services the API uses.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from tally.bootstrap import admin_key_directory, check_keyring, create_secret_file
from tally.cli import audit, billing, crypto, epoch, keys
from tally.cli.common import (
    JsonOption,
    TallyGroup,
    command_store,
    emit,
    err,
    out,
    parse_input,
    registry,
    settings,
)
from tally.cli.common import table_of as _table
from tally.registry.audit import Actor
from tally.registry.models import ApplicationIn, ApplicationOut, TenantIn, TenantOut, TenantPatch
from tally.registry.service import Registry
from tally.settings import Settings

# The first admin key's file, when no terminal shows it: ADMIN_KEY_FILE-<random> (.gitignore).
ADMIN_KEY_FILE = "tally-admin-key"

# TallyGroup renders every command's errors, as JSON under --json. Tracebacks (bugs only)
# show no local variables: those can hold database URLs and keys.
app = typer.Typer(
    cls=TallyGroup,
    no_args_is_help=True,
    add_completion=False,
    help=__doc__,
    pretty_exceptions_show_locals=False,
)
tenants_app = typer.Typer(no_args_is_help=True, help="Register, list and shred tenants.")
applications_app = typer.Typer(no_args_is_help=True, help="Register and list applications.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(applications_app, name="applications")
app.add_typer(keys.app, name="keys")
app.add_typer(audit.app, name="audit")
app.add_typer(crypto.app, name="keyring")
app.add_typer(epoch.app, name="epoch")
app.command("reencrypt")(crypto.reencrypt)
app.command("reindex")(crypto.reindex)
tenants_app.command("shred")(crypto.shred)
billing.register(app)


def _print_version(wanted: bool) -> None:
    if wanted:
        sys.stdout.write(f"tally {metadata.version('tally')}\n")
        raise typer.Exit


@app.callback()
def _options(
    *,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    del version  # acted on by its callback, before any command


@app.command()
def migrate(as_json: JsonOption = False) -> None:
    """Create or update the schema of the configured store.

    On PostgreSQL as the owner role (TALLY_OWNER_DATABASE_URL, else TALLY_DATABASE_URL's),
    which then grants the service role exactly what it needs."""
    with command_store(migrate=True) as store:
        del store
    emit({"status": "current"}, as_json=as_json, text="Schema is current.")


@app.command()
def serve(
    *,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate chain: serve HTTPS only (TALLY_TLS_CERT).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="PEM private key of --tls-cert (TALLY_TLS_KEY).")
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(help="PEM CA bundle: require client certificates (TALLY_TLS_CLIENT_CA)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run the API. On an empty store, create the schema and issue a one-time admin key:
    printed when stdout is a terminal, else written to an owner-only file whose path is
    printed."""
    from tally import metrics  # noqa: PLC0415 - only this command needs the server
    from tally.api import server  # noqa: PLC0415 - only this command needs the server

    options = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_client_ca": tls_client_ca}
    configured = settings(**{name: value for name, value in options.items() if value is not None})
    # Everything that can stop the start is checked before anything is written: a start
    # that fails after issuing the first admin key would leave a store whose key nobody has.
    try:
        server.check(configured)
        metrics.check_port(configured, api_port=port)
    except ValueError as error:
        err.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    with crypto.keyring_errors():
        check_keyring(configured)
    with command_store(migrate=True):
        pass
    crypto.announce_new_keyring(as_json)
    with command_store() as store:
        _first_admin_key(registry(store), configured, as_json=as_json)
    sys.stdout.flush()
    status = server.run(configured, host=host, port=port, workers=workers)
    if status:
        raise typer.Exit(status)


def _first_admin_key(found: Registry, configured: Settings, *, as_json: bool) -> None:
    """On a store without keys, issue the first admin key and hand it over: on the terminal
    when there is one, else in a new owner-only file whose path is printed. Never to a log,
    nor to a captured stdout, which usually ends in one."""
    if found.store.count_keys() > 0:
        return
    if sys.stdout.isatty():
        first = found.bootstrap_admin_key(actor=Actor.cli())
        if first is None:
            return
        if as_json:
            emit(first.model_dump(mode="json"), as_json=True)
            return
        out.print("[bold]This is a new Tally store. Its first admin key, shown only now:[/bold]")
        out.print(f"\n    {first.key}\n")
        out.print("Keep it secret; create more keys with it or with 'tally keys create'.")
        return
    # The file is made before the key, so a directory Tally cannot write to stops the start
    # with no key issued (the next start tries again).
    try:
        path, descriptor = create_secret_file(admin_key_directory(configured), ADMIN_KEY_FILE)
    except OSError as error:
        err.print(f"[red]Cannot write the first admin key's file: {error.strerror}[/red]")
        raise typer.Exit(1) from None
    with os.fdopen(descriptor, "w") as file:
        try:
            first = found.bootstrap_admin_key(actor=Actor.cli())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if first is None:  # another process issued it between the count and now
            path.unlink(missing_ok=True)
            return
        file.write(f"{first.key}\n")
        file.flush()
        os.fsync(file.fileno())
    if as_json:
        described = first.model_dump(mode="json", exclude={"key"})
        emit({**described, "key_file": str(path.resolve())}, as_json=True)
        return
    out.print("[bold]This is a new Tally store. Its first admin key is in this file:[/bold]")
    out.print(f"\n    {path.resolve()}\n", soft_wrap=True)
    out.print("Only you can read the file: copy the key somewhere safe, then delete it.")


@tenants_app.command("create")
def tenants_create(
    tenant_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    region: Annotated[str | None, typer.Option(help="Home region (default: TALLY_REGION).")] = None,
    lateness_hours: Annotated[int | None, typer.Option(help="Lateness window, hours.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Register a tenant. Refused, as `tally serve` refuses to start, while the store has no
    keyring to seal the tenant's data with (TALLY_KEYRING unset on PostgreSQL)."""
    spec = parse_input(
        TenantIn, id=tenant_id, name=name, region=region, lateness_hours=lateness_hours
    )
    with crypto.keyring_errors():
        check_keyring(settings())
    with command_store() as store:
        tenant = registry(store).create_tenant(spec, actor=Actor.cli())
    data = TenantOut.model_validate(tenant, from_attributes=True).model_dump(mode="json")
    emit(data, as_json=as_json, text=f"Tenant {tenant.id} registered.")


@tenants_app.command("update")
def tenants_update(
    tenant_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option(help="New display name.")] = None,
    lateness_hours: Annotated[
        int | None, typer.Option(help="New lateness window, hours (for events sent from now).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Rename a tenant or change its lateness window (audited as tenant.update). A shorter
    window applies to events sent from now on: the events stored stay."""
    patch = parse_input(TenantPatch, name=name, lateness_hours=lateness_hours)
    with command_store() as store:
        tenant = registry(store).update_tenant(tenant_id, patch, actor=Actor.cli())
    emit(tenant.model_dump(mode="json"), as_json=as_json, text=f"Tenant {tenant.id} updated.")


@tenants_app.command("list")
def tenants_list(as_json: JsonOption = False) -> None:
    """List tenants, with each one's lateness window and whether it is shredded."""
    with command_store() as store:
        rows = [tenant.model_dump(mode="json") for tenant in registry(store).list_tenants()]
    columns = ["id", "name", "region", "lateness_hours", "shredded"]
    emit(rows, as_json=as_json, table=_table(rows, columns))


@applications_app.command("create")
def applications_create(
    application_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Register an application (a reporter of events)."""
    spec = parse_input(ApplicationIn, id=application_id, name=name)
    with command_store() as store:
        application = registry(store).create_application(spec, actor=Actor.cli())
    data = ApplicationOut.model_validate(application, from_attributes=True).model_dump(mode="json")
    emit(data, as_json=as_json, text=f"Application {application.id} registered.")


@applications_app.command("list")
def applications_list(as_json: JsonOption = False) -> None:
    """List applications."""
    with command_store() as store:
        rows = [
            ApplicationOut.model_validate(a, from_attributes=True).model_dump(mode="json")
            for a in store.list_applications()
        ]
    emit(rows, as_json=as_json, table=_table(rows, ["id", "name", "created_at"]))


def main() -> None:
    app()
