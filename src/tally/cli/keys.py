"""`tally keys`: issue, list, rotate and revoke API keys (secrets are printed once)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from tally.bootstrap import utc_now
from tally.cli.common import (
    JsonOption,
    command_store,
    emit,
    out,
    parse_duration,
    parse_input,
    registry,
    table_of,
)
from tally.errors import LastAdminKey
from tally.registry.audit import Actor
from tally.registry.models import KeyIn, KeyOut, NewKeyOut, RotateIn
from tally.registry.service import describe_key

app = typer.Typer(no_args_is_help=True, help="Issue, list, rotate and revoke API keys.")


def _show_secret(issued: NewKeyOut, *, as_json: bool, intro: str) -> None:
    if as_json:
        emit(issued.model_dump(mode="json"), as_json=True)
        return
    out.print(f"{intro} {issued.id} ({', '.join(issued.scopes)}), shown only now:\n")
    out.print(f"    {issued.key}\n")


@app.command("create")
def keys_create(
    scope: Annotated[
        list[str], typer.Option(help="admin, events:write, events:read or usage:read; repeatable.")
    ],
    application: Annotated[str | None, typer.Option(help="With events:write: reports as.")] = None,
    tenant: Annotated[
        list[str] | None, typer.Option(help="Restrict to tenant; repeatable.")
    ] = None,
    expires_in: Annotated[
        timedelta | None,
        typer.Option(parser=parse_duration, metavar="DURATION", help="Lifetime, e.g. 90d or 12h."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Issue an API key. Its secret is printed once and never again."""
    expires_at = (utc_now() + expires_in).isoformat() if expires_in is not None else None
    spec = parse_input(
        KeyIn, scopes=scope, application=application, tenants=tenant or None, expires_at=expires_at
    )
    with command_store() as store:
        issued = registry(store).create_key(spec, actor=Actor.cli())
    _show_secret(issued, as_json=as_json, intro="Key")


def _when(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ") if value is not None else None


def _status(key: KeyOut, now: datetime) -> str:
    """Whether the key works, until when, and its place in a rotation chain, in a few words."""
    if key.revoked_at is not None:
        state = f"revoked {_when(key.revoked_at)}"
    elif key.expires_at is not None and key.expires_at <= now:
        state = f"expired {_when(key.expires_at)}"
    elif key.expires_at is not None:
        state = f"works until {_when(key.expires_at)}"
    else:
        state = "active"
    if key.replaced_by is not None:
        state += f"; replaced by {key.replaced_by}"
    if key.rotated_from is not None:
        state += f"; replaces {key.rotated_from}"
    return state


@app.command("list")
def keys_list(as_json: JsonOption = False) -> None:
    """List keys (never their secrets), with their last use and rotation chain."""
    with command_store() as store:
        described = [describe_key(record) for record in store.list_keys()]
    if as_json:
        emit([key.model_dump(mode="json") for key in described], as_json=True)
        return
    # The table is for people on an 80-column terminal: six columns, times to the minute,
    # expiry and the rotation chain in one status; --json has every field in full.
    now = utc_now()
    rows = [
        {
            "id": key.id,
            "scopes": key.scopes,
            "application": key.application,
            "tenants": key.tenants,
            "status": _status(key, now),
            "last used": _when(key.last_used_at),
        }
        for key in described
    ]
    columns = ["id", "scopes", "application", "tenants", "status", "last used"]
    emit(rows, as_json=False, table=table_of(rows, columns))


@app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    grace: Annotated[
        timedelta,
        typer.Option(
            parser=parse_duration,
            metavar="DURATION",
            help="How long the old key keeps working: 0s to 30d, e.g. 24h.",
        ),
    ],
    as_json: JsonOption = False,
) -> None:
    """Issue a replacement key (same scopes, application, tenants and lifetime) and retire
    this one after the grace period. The new secret is printed once."""
    # Checked by the API's own model, so both refuse the same graces with the same message.
    spec = parse_input(RotateIn, grace_seconds=int(grace.total_seconds()))
    with command_store() as store:
        issued = registry(store).rotate_key(
            key_id, grace=timedelta(seconds=spec.grace_seconds), actor=Actor.cli()
        )
    _show_secret(issued, as_json=as_json, intro=f"Key {key_id} is replaced by")


@app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Revoke even the last valid admin key ('tally keys create --scope admin' "
            "on this host makes a new one).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Revoke a key at once. The last admin key that stays valid only with --force."""
    with command_store() as store:
        try:
            registry(store).revoke_key(key_id, actor=Actor.cli(), force=force)
        except LastAdminKey:
            raise LastAdminKey(
                " Or revoke it with --force: 'tally keys create --scope admin' on this host "
                "makes a new one."
            ) from None
    emit({"id": key_id, "revoked": True}, as_json=as_json, text=f"Key {key_id} revoked.")
