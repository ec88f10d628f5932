"""What every `tally` command shares: the store, the registry, input checking and output.

Kept apart from main.py so that command groups in their own modules (keys.py, audit.py) can use
it without importing main.py, which imports them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar
from urllib.parse import unquote, urlsplit

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError
from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from tally.bootstrap import open_store, utc_now
from tally.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    StoreUnavailable,
    TallyError,
)
from tally.events.validation import parse_rfc3339, pointer_of
from tally.registry.service import Registry
from tally.settings import Settings
from tally.store.interface import EventStore

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


class CommandError(Exception):
    """Why a command failed: a stable `code` for scripts, a `message` and its `details` for
    people, and the exit code. Rendered in one place (`TallyGroup.main`), as JSON on stdout
    under `--json` and as text on stderr otherwise."""

    def __init__(
        self, code: str, message: str, *, details: Sequence[str] = (), exit_code: int = 1
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)
        self.exit_code = exit_code


# Domain error class -> the code scripts see; the most specific class first.
_CODES: list[tuple[type[TallyError], str]] = [
    (Conflict, "conflict"),
    (InvalidInput, "invalid-input"),
    (NotFound, "not-found"),
    (Forbidden, "forbidden"),
    (StoreUnavailable, "store-unavailable"),
]


def _failure_of(error: Exception, *, as_json: bool) -> CommandError | None:
    """`error` as the CommandError to render, or None for one that should surface as is."""
    if isinstance(error, CommandError):
        return error
    if isinstance(error, TallyError):
        code = next((code for kind, code in _CODES if isinstance(error, kind)), "failed")
        details = [
            f"{problem.parameter or problem.pointer.lstrip('/') or 'input'}: {problem.detail}"
            for problem in (error.errors if isinstance(error, InvalidInput) else [])
        ]
        if isinstance(error, StoreUnavailable) and error.__cause__ is not None:
            # The driver's reason (libpq's "connection refused", "database … does not exist")
            # is what an operator must fix; the domain message alone names no cause.
            lines = [line.strip() for line in str(error.__cause__).splitlines()]
            details += [line for line in lines if line] or [type(error.__cause__).__name__]
        return CommandError(code, error.detail, details=details)
    if isinstance(error, typer.TyperException):  # Click's usage errors, as Typer ships it
        return CommandError("usage", error.format_message(), exit_code=error.exit_code)
    if isinstance(error, typer.Abort):
        return CommandError("aborted", "Aborted: nothing was done.")
    if as_json:
        # A bug, but a script still gets one JSON object; run without --json for the trace.
        return CommandError("internal-error", f"{type(error).__name__}: {error}")
    return None


# user:password@ in a URL, and password=... in a libpq connection string.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*(?=@)", re.I)
_CONNINFO_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)
_SECRET_URLS = ("TALLY_DATABASE_URL", "TALLY_OWNER_DATABASE_URL")


def redact(text: str) -> str:
    """`text` without the password of any URL or connection string in it, nor the passwords
    of the configured database URLs wherever they appear (a driver may echo its input)."""
    for name in _SECRET_URLS:
        try:
            password = urlsplit(os.environ.get(name, "")).password
        except ValueError:  # a malformed URL: the patterns below still apply
            password = None
        for form in {password, unquote(password or "")} - {None, ""}:
            # As a whole word only, so that a short password does not mangle the message.
            word = rf"(?<![A-Za-z0-9]){re.escape(str(form))}(?![A-Za-z0-9])"
            text = re.sub(word, "***", text)
    text = _URL_PASSWORD.sub(r"\g<head>***", text)
    return _CONNINFO_PASSWORD.sub(r"\g<head>***", text)


def _wants_json(args: Sequence[str]) -> bool:
    """Whether `--json` was given: read from the arguments themselves, so that even an error
    in parsing them (an unknown option, a bad value) is answered as JSON."""
    options = list(args)
    if "--" in options:
        options = options[: options.index("--")]
    return "--json" in options


def _render(failure: CommandError, *, as_json: bool) -> None:
    message = redact(failure.message)
    details = [redact(detail) for detail in failure.details]
    if as_json:
        error: dict[str, Any] = {"code": failure.code, "message": message}
        if details:
            error["details"] = details
        sys.stdout.write(json.dumps({"error": error}) + "\n")
        sys.stdout.flush()
        return
    # Text, not markup: a message may hold brackets ("[::1]") that Rich would read as styles.
    err.print(Text(message, style="red"))
    for detail in details:
        err.print(Text(f"  {detail}"))


class TallyGroup(TyperGroup):
    """The `tally` command group: every command's errors are rendered here, once."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        as_json = _wants_json(argv)
        run = functools.partial(
            super().main,
            argv,
            prog_name,
            complete_var,
            windows_expand_args=windows_expand_args,
            **extra,
        )
        try:
            if not as_json:
                # Typer renders usage errors itself; domain errors come out of it to here.
                return run(standalone_mode=standalone_mode)
            # Under --json, usage errors must come out too, to be rendered as JSON.
            result = run(standalone_mode=False)
        except Exception as error:  # each kind is sorted by _failure_of; the rest re-raised
            failure = _failure_of(error, as_json=as_json)
            if failure is None:
                raise
            _render(failure, as_json=as_json)
            if standalone_mode:
                sys.exit(failure.exit_code)
            return failure.exit_code
        if standalone_mode:
            # Not standalone, Click returns a command's typer.Exit code as the result.
            sys.exit(result if isinstance(result, int) else 0)
        return result


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
DURATION_FORMS = "a duration such as 24h, 7d or 30m (a whole number and s, m, h, d or w)"
TIME_FORMS = "an RFC 3339 timestamp such as 2026-01-31T12:00:00Z"


def parse_duration(text: str) -> timedelta:
    """'90d', '12h', '30m', '45s', '2w' (one number and one unit), for `typer.Option(parser=)`.

    Raises typer.BadParameter naming the accepted forms, which Click reports with the option.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not {DURATION_FORMS}")
    try:
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        raise typer.BadParameter(f"{text!r} is far too long") from None


def parse_since(text: str) -> datetime:
    """A time given as RFC 3339 or as a duration ago ('24h': a day ago), for `parser=`.

    Raises typer.BadParameter naming both accepted forms.
    """
    if _DURATION.fullmatch(text.strip()):
        try:
            return utc_now() - parse_duration(text)
        except OverflowError:  # before year 1
            raise typer.BadParameter(f"{text!r} is far too long ago") from None
    try:
        return parse_rfc3339(text)
    except PydanticCustomError as error:
        if error.type == "time_format":
            reason = f"is neither {TIME_FORMS} nor {DURATION_FORMS} (that long ago)"
        else:  # the form of a time but no real one (2026-02-30…): say which, then the forms
            reason = f"{error.message()}; use {TIME_FORMS}, or {DURATION_FORMS} (that long ago)"
        raise typer.BadParameter(f"{text!r} {reason}") from None


def settings(**overrides: Any) -> Settings:
    """The settings from TALLY_* variables, `overrides` (command options) taking precedence.

    Raises CommandError (exit code 2) naming each variable to fix.
    """
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = [
            f"Setting TALLY_{str(item['loc'][0]).upper()}: {item['msg']}" for item in error.errors()
        ]
        raise _many("invalid-setting", problems, "settings are invalid", exit_code=2) from None


def _many(code: str, problems: list[str], what: str, *, exit_code: int) -> CommandError:
    """One problem as the message; several as a count and one detail each."""
    if len(problems) == 1:
        return CommandError(code, problems[0], exit_code=exit_code)
    return CommandError(code, f"{len(problems)} {what}", details=problems, exit_code=exit_code)


@contextmanager
def command_store(*, migrate: bool = False) -> Iterator[EventStore]:
    """The configured store, closed after use. Its domain errors reach `TallyGroup.main`."""
    store = open_store(settings(), migrate=migrate)
    try:
        yield store
    finally:
        store.close()


def registry(store: EventStore) -> Registry:
    return Registry(store=store, region=settings().region, clock=utc_now)


M = TypeVar("M", bound=BaseModel)


def parse_input(model: type[M], **fields: Any) -> M:
    """The CLI's arguments through the API's own input model, with its messages.

    Raises CommandError (exit code 2) with one message per problem.
    """
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        problems = [
            f"{pointer_of(item['loc']).lstrip('/') or 'input'}: {item['msg']}"
            for item in error.errors(include_input=False, include_url=False)
        ]
        raise _many("invalid-input", problems, "inputs are invalid", exit_code=2) from None


def emit(
    data: Any,
    *,
    as_json: bool,
    text: str = "",
    table: Callable[[], RenderableType] | None = None,
) -> None:
    """JSON on one line for scripts (never wrapped), else `table` or `text` for people."""
    if as_json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")
    elif table is not None:
        out.print(table())
    else:
        out.print(text)


def table_of(rows: list[dict[str, Any]], columns: list[str]) -> Callable[[], RenderableType]:
    """`rows` for people, at the terminal's width when printed: a table when every word of
    every cell fits its column, else one block of `column value` lines per row.

    Either way a word (an id, a key id, a time, a scope) is never split across lines, so it
    stays copyable, unless it is wider than the terminal itself. Rich alone would fold words
    to fit columns it shrinks, so the column widths are planned here (`_plan_widths`).
    """

    def build() -> RenderableType:
        cells = [[_cell(row.get(column)) for column in columns] for row in rows]
        widths = _plan_widths([columns, *cells], out.width)
        if widths is None:
            return _records(columns, cells)
        table = Table()
        for column, width in zip(columns, widths, strict=True):
            table.add_column(column, width=width)
        for row in cells:
            table.add_row(*(Text(cell) for cell in row))
        return table

    return build


def _plan_widths(lines: list[list[str]], terminal: int) -> list[int] | None:
    """Column widths for a default Rich table (borders, one space of padding each side)
    that fit `terminal` with no word split; None when the longest words alone do not fit."""
    count = len(lines[0])
    room = terminal - (count + 1) - 2 * count
    longest = [
        max(cell_len(word) for row in lines for word in [*row[i].split(), ""]) for i in range(count)
    ]
    widest = [max(cell_len(row[i]) for row in lines) for i in range(count)]
    if sum(longest) > room:
        return None
    if sum(widest) <= room:
        return widest
    # Every column gets its longest word; the rest of the room goes to the columns that
    # would wrap, in proportion to what they lack.
    spare = room - sum(longest)
    lacking = [w - m for w, m in zip(widest, longest, strict=True)]
    total = sum(lacking)
    return [m + spare * lack // total for m, lack in zip(longest, lacking, strict=True)]


def _records(columns: list[str], cells: list[list[str]]) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style="bold")
    grid.add_column(overflow="fold")  # only a word wider than the terminal itself
    for n, row in enumerate(cells):
        if n:
            grid.add_row("", "")
        for column, cell in zip(columns, row, strict=True):
            grid.add_row(column, Text(cell))
    return grid


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
