"""`tally audit list`: the audit log of administrative actions, newest first."""

from __future__ import annotations

import json
import shlex
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.text import Text

from tally.cli.common import (
    JsonOption,
    command_store,
    emit,
    out,
    parse_input,
    parse_since,
    registry,
    table_of,
)
from tally.events.model import format_time
from tally.registry.audit import CLI_SOURCE
from tally.registry.models import AuditQuery

app = typer.Typer(no_args_is_help=True, help="List the audit log of administrative actions.")

DEFAULT_LIMIT = 100


@app.command("list")
def audit_list(
    *,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. key.rotate.")] = None,
    actor: Annotated[
        str | None, typer.Option(help="Only this actor: a key id or cli:<user>.")
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option(
            parser=parse_since,
            metavar="TIME|DURATION",
            help="From this RFC 3339 time, or this long ago (24h, 7d).",
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many entries (1-1000).")] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, typer.Option(help="Older entries: a printed cursor.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List administrative actions, newest first: who, what, when, from where."""
    since_text = None if since is None else format_time(since)
    query = parse_input(
        AuditQuery, action=action, actor=actor, since=since_text, limit=limit, cursor=cursor
    )
    with command_store() as store:
        page = registry(store).audit_page(query)
    if as_json:
        emit(page.model_dump(mode="json"), as_json=True)
        return
    # The table is for people on an 80-column terminal: seconds are enough, who and from
    # where in one column, details as key=value pairs; --json has every field (sequence
    # numbers and request ids included) in full.
    rows = [
        {
            "at": entry.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            "who": entry.actor if entry.source == CLI_SOURCE else f"{entry.actor} @ {entry.source}",
            "action": entry.action,
            "target": entry.target,
            "details": " ".join(
                f"{name}={json.dumps(value)}" for name, value in sorted(entry.details.items())
            ),
        }
        for entry in page.entries
    ]
    columns = ["at", "who", "action", "target", "details"]
    emit(rows, as_json=False, table=table_of(rows, columns))
    if page.has_more:
        # The same filters again, `--since` as the time it meant (a duration would move on),
        # so that the next page continues this listing rather than starting another.
        again = {"--action": action, "--actor": actor, "--since": since_text}
        again["--limit"] = str(limit) if limit != DEFAULT_LIMIT else None
        command = ["tally", "audit", "list"]
        command += [part for option, value in again.items() if value for part in (option, value)]
        command += ["--cursor", str(page.next_cursor)]
        out.print(Text(f"More: {shlex.join(command)}"), soft_wrap=True)
