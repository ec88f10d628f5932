"""`tally`: serve, migrate, and register tenants, applications and keys.

Every command takes `--json` for scripts. Commands talk to the store named by
TALLY_DATABASE_URL directly, through the same services the API uses.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from tally.bootstrap import open_store, utc_now
from tally.errors import InvalidInput, TallyError
from tally.events.validation import pointer_of
from tally.registry.models import ApplicationIn, ApplicationOut, KeyIn, TenantIn, TenantOut
from tally.registry.service import Registry, describe_key
from tally.settings import Settings
from tally.store.interface import EventStore

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
tenants_app = typer.Typer(no_args_is_help=True, help="Register and list tenants.")
applications_app = typer.Typer(no_args_is_help=True, help="Register and list applications.")
keys_app = typer.Typer(no_args_is_help=True, help="Issue, list and revoke API keys.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(applications_app, name="applications")
app.add_typer(keys_app, name="keys")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """'90d', '12h', '30m', '45s', '2w' (one number and one unit)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise typer.BadParameter("use a number and a unit: 45s, 30m, 12h, 90d or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        for item in error.errors():
            err.print(f"[red]Setting TALLY_{str(item['loc'][0]).upper()}: {item['msg']}[/red]")
        raise typer.Exit(2) from None


@contextmanager
def command_store(*, migrate: bool = False) -> Iterator[EventStore]:
    """The configured store; domain errors become a message and exit code 1."""
    # The pool retries in the background and logs each failure; the CLI reports once.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    try:
        store = open_store(settings(), migrate=migrate)
    except TallyError as error:
        err.print(f"[red]{error.detail}[/red]")
        if error.__cause__ is not None:
            # The driver's reason (host, port, database; never a password) says what to fix.
            reason = str(error.__cause__).strip().splitlines()
            err.print(f"  {reason[0] if reason else type(error.__cause__).__name__}")
        raise typer.Exit(1) from None
    try:
        yield store
    except TallyError as error:
        err.print(f"[red]{error.detail}[/red]")
        for problem in error.errors if isinstance(error, InvalidInput) else []:
            err.print(f"  {problem.pointer or '/'}: {problem.detail}")
        raise typer.Exit(1) from None
    finally:
        store.close()


def registry(store: EventStore) -> Registry:
    return Registry(store=store, region=settings().region, clock=utc_now)


M = TypeVar("M", bound=BaseModel)


def parse_input(model: type[M], **fields: Any) -> M:
    """The CLI's arguments through the API's own input model, with its messages."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        for item in error.errors(include_input=False, include_url=False):
            err.print(f"[red]{pointer_of(item['loc']).lstrip('/') or 'input'}: {item['msg']}[/red]")
        raise typer.Exit(2) from None


def emit(
    data: Any, *, as_json: bool, text: str = "", table: Callable[[], Table] | None = None
) -> None:
    """JSON on one line for scripts (never wrapped), else `table` or `text` for people."""
    if as_json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")
    elif table is not None:
        out.print(table())
    else:
        out.print(text)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> Callable[[], Table]:
    def build() -> Table:
        table = Table()
        for column in columns:
            # Ids must stay copyable: never wrapped inside a cell.
            table.add_column(column, no_wrap=column == "id", overflow="fold")
        for row in rows:
            table.add_row(*(_cell(row.get(column)) for column in columns))
        return table

    return build


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


@app.command()
def migrate(as_json: JsonOption = False) -> None:
    """Create or update the schema of the configured store."""
    with command_store(migrate=True) as store:
        del store
    emit({"status": "current"}, as_json=as_json, text="Schema is current.")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    as_json: JsonOption = False,
) -> None:
    """Run the API. On an empty store, create the schema and print a one-time admin key."""
    import uvicorn  # noqa: PLC0415 - only this command needs the server

    configured = settings()
    with command_store(migrate=True) as store:
        first = registry(store).bootstrap_admin_key()
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
    uvicorn.run(
        "tally.api.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=configured.log_level,
        timeout_graceful_shutdown=30,
    )


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
        tenant = registry(store).create_tenant(spec)
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
        application = registry(store).create_application(spec)
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


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        list[str], typer.Option(help="admin, events:write, events:read or usage:read; repeatable.")
    ],
    application: Annotated[str | None, typer.Option(help="With events:write: reports as.")] = None,
    tenant: Annotated[
        list[str] | None, typer.Option(help="Restrict to tenant; repeatable.")
    ] = None,
    expires_in: Annotated[str | None, typer.Option(help="Lifetime, e.g. 90d or 12h.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Issue an API key. Its secret is printed once and never again."""
    expires_at = (utc_now() + parse_duration(expires_in)).isoformat() if expires_in else None
    spec = parse_input(
        KeyIn, scopes=scope, application=application, tenants=tenant or None, expires_at=expires_at
    )
    with command_store() as store:
        issued = registry(store).create_key(spec)
    if as_json:
        emit(issued.model_dump(mode="json"), as_json=True)
        return
    out.print(f"Key {issued.id} ({', '.join(issued.scopes)}), shown only now:\n")
    out.print(f"    {issued.key}\n")


@keys_app.command("list")
def keys_list(as_json: JsonOption = False) -> None:
    """List keys (never their secrets)."""
    with command_store() as store:
        rows = [describe_key(record).model_dump(mode="json") for record in store.list_keys()]
    columns = ["id", "scopes", "application", "tenants", "expires_at", "revoked_at"]
    emit(rows, as_json=as_json, table=_table(rows, columns))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOption = False
) -> None:
    """Revoke a key at once."""
    with command_store() as store:
        registry(store).revoke_key(key_id)
    emit({"id": key_id, "revoked": True}, as_json=as_json, text=f"Key {key_id} revoked.")


def main() -> None:
    app()
