"""What every `tally` command shares: the store, the registry, input checking and output.

Kept apart from main.py so that command groups in their own modules (keys.py, audit.py) can use
it without importing main.py, which imports them.
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
from tally.registry.service import Registry
from tally.settings import Settings
from tally.store.interface import EventStore

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
    try:
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        raise typer.BadParameter("is far too long") from None


def settings(**overrides: Any) -> Settings:
    """The settings from TALLY_* variables, `overrides` (command options) taking precedence."""
    try:
        return Settings(**overrides)
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
            err.print(f"  {problem.parameter or problem.pointer or '/'}: {problem.detail}")
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


def table_of(rows: list[dict[str, Any]], columns: list[str]) -> Callable[[], Table]:
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
