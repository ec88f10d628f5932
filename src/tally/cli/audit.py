"""`tally audit list`: the audit log of administrative actions, newest first."""

from __future__ import annotations

import json
from datetime import UTC
from typing import Annotated

import typer

from tally.bootstrap import utc_now
from tally.cli.common import JsonOption, command_store, emit, out, parse_input, registry, table_of
from tally.cli.common import parse_duration as _parse_duration
from tally.registry.audit import CLI_SOURCE
from tally.registry.models import AuditQuery

app = typer.Typer(no_args_is_help=True, help="List the audit log of administrative actions.")


def _since(text: str | None) -> str | None:
    """`--since` as RFC 3339 text: a time as given, or a duration ago ('24h', '7d')."""
    if text is None or not text[:1].isdigit() or "-" in text:
        return text
    try:
        return (utc_now() - _parse_duration(text)).isoformat()
    except typer.BadParameter:
        return text  # not a duration: the model judges it as a time, with its message


@app.command("list")
def audit_list(
    *,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. key.rotate.")] = None,
    actor: Annotated[
        str | None, typer.Option(help="Only this actor: a key id or cli:<user>.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="From this RFC 3339 time, or this long ago (24h, 7d).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many entries (1-1000).")] = 100,
    cursor: Annotated[str | None, typer.Option(help="Older entries: a printed cursor.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List administrative actions, newest first: who, what, when, from where."""
    query = parse_input(
        AuditQuery, action=action, actor=actor, since=_since(since), limit=limit, cursor=cursor
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
        out.print(f"More: tally audit list --cursor {page.next_cursor}")
