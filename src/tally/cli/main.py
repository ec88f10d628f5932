"""`tally`: serve, migrate, and register tenants, applications and keys.

Every command takes `--json` for scripts. Commands talk to the store named by
TALLY_DATABASE_URL directly, through the same services the API uses.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from tally.cli import audit, crypto, keys
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
from tally.registry.models import ApplicationIn, ApplicationOut, TenantIn, TenantOut

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
app.command("reencrypt")(crypto.reencrypt)
tenants_app.command("shred")(crypto.shred)


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
    """Run the API. On an empty store, create the schema and print a one-time admin key."""
    from tally.api import server  # noqa: PLC0415 - only this command needs the server

    options = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_client_ca": tls_client_ca}
    configured = settings(**{name: value for name, value in options.items() if value is not None})
    try:
        server.check(configured)
    except ValueError as error:
        err.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    with command_store(migrate=True) as store:
        first = registry(store).bootstrap_admin_key(actor=Actor.cli())
    crypto.announce_new_keyring(as_json)
    if first is not None:
        if as_json:
            emit(first.model_dump(mode="json"), as_json=True)
        else:
            out.print(
                "[bold]This is a new Tally store. Its first admin key, shown only now:[/bold]"
            )
            out.print(f"\n    {first.key}\n")
            out.print("Keep it secret; create more keys with it or with 'tally keys create'.")
    sys.stdout.flush()
    server.run(configured, host=host, port=port, workers=workers)


@tenants_app.command("create")
def tenants_create(
    tenant_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    region: Annotated[str | None, typer.Option(help="Home region (default: TALLY_REGION).")] = None,
    lateness_hours: Annotated[int | None, typer.Option(help="Lateness window, hours.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Register a tenant."""
    spec = parse_input(
        TenantIn, id=tenant_id, name=name, region=region, lateness_hours=lateness_hours
    )
    with command_store() as store:
        tenant = registry(store).create_tenant(spec, actor=Actor.cli())
    data = TenantOut.model_validate(tenant, from_attributes=True).model_dump(mode="json")
    emit(data, as_json=as_json, text=f"Tenant {tenant.id} registered.")


@tenants_app.command("list")
def tenants_list(as_json: JsonOption = False) -> None:
    """List tenants."""
    with command_store() as store:
        rows = [
            TenantOut.model_validate(t, from_attributes=True).model_dump(mode="json")
            for t in store.list_tenants()
        ]
    emit(rows, as_json=as_json, table=_table(rows, ["id", "name", "region", "lateness_hours"]))


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
