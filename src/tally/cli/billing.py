"""`tally export`, `tally usage`, `tally reconcile`: the billing operator's commands.

They talk to a running Tally over HTTP through the client SDK (`tally.client`), with a key of
the billing system's, never to the store: an operator needs no database credentials, and what
they see is exactly what the API gives a billing system.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal, localcontext
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, BinaryIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tally.api.render import csv_lines, ndjson_lines
from tally.cli.common import CommandError, JsonOption, emit, err, out, parse_since, table_of
from tally.client import Client, LogRewound, TallyError
from tally.errors import InvalidInput
from tally.events.digest import DigestAccumulator, canonical_decimal, canonical_time
from tally.events.log import EXPORT_CSV_COLUMNS
from tally.events.model import EXACT

CSV_COLUMNS = EXPORT_CSV_COLUMNS
FORMATS = ("ndjson", "csv")
# tally export commits (fsyncs the output, then replaces the cursor file) at least this often.
COMMIT_ENTRIES = 1000
COMMIT_SECONDS = 1.0

UrlOption = Annotated[
    str,
    typer.Option(
        "--url", envvar="TALLY_URL", help="Tally's base URL, e.g. https://tally.example.com."
    ),
]
KeyOption = Annotated[
    str,
    typer.Option(
        "--key",
        envvar="TALLY_KEY",
        show_default=False,
        help="The API key; better set TALLY_KEY: a command line is visible to every user (ps).",
    ),
]
DeadlineOption = Annotated[
    float,
    typer.Option(min=0, help="Seconds to keep retrying a request Tally does not answer."),
]
FromOption = Annotated[
    datetime,
    typer.Option(
        "--from",
        parser=parse_since,
        metavar="TIME",
        help="Start, inclusive: RFC 3339, or a duration ago such as 24h.",
    ),
]
ToOption = Annotated[
    datetime,
    typer.Option("--to", parser=parse_since, metavar="TIME", help="End, exclusive: as --from."),
]


# --- the SDK, with its refusals as the CLI's errors ----------------------------------------

_STATUS_CODES = {
    400: "invalid-input",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    406: "invalid-input",
    409: "conflict",
    422: "invalid-input",
}


def _command_error(error: TallyError) -> CommandError:
    """A refusal of Tally (or no answer) as the CLI's error: the problem's title and detail,
    one line per `errors` item naming its parameter or pointer. The SDK never puts the key
    in a problem, and neither does this."""
    problem = error.problem
    code = "unreachable" if error.status is None else _STATUS_CODES.get(error.status, "failed")
    title, detail = problem.get("title"), problem.get("detail")
    message = ". ".join(str(part).rstrip(".") for part in (title, detail) if part) + "."
    details = [
        f"{item.get('parameter') or str(item.get('pointer', '')).lstrip('/') or 'input'}: "
        f"{item.get('detail', '')}"
        for item in error.errors
    ]
    if isinstance(error, LogRewound) and error.resume_cursor:
        details.append(
            "tally export: run it again with --on-rewind resume to go on from where the file "
            "and the log agree, skipping the entries the file holds"
        )
        details.append(f"resume_cursor: {error.resume_cursor}")
    if error.status is not None:
        details.append(f"HTTP {error.status}" + (f" {error.code}" if error.code else ""))
    return CommandError(
        code, message, details=details, exit_code=2 if code == "invalid-input" else 1
    )


@contextmanager
def connected(url: str, key: str, deadline: float) -> Iterator[Client]:
    """A client of Tally at `url`; its refusals come out as CommandError."""
    if not url.startswith(("http://", "https://")):
        raise CommandError("usage", "--url must start with http:// or https://.", exit_code=2)
    if not key.strip():
        raise CommandError("usage", "Give the API key in TALLY_KEY (or --key).", exit_code=2)
    tally = Client(url, key.strip(), deadline=deadline)
    try:
        yield tally
    except TallyError as error:
        raise _command_error(error) from None
    finally:
        tally.close()


def _exact(value: object) -> Decimal:
    return Decimal(canonical_decimal(value))


# --- tally export ----------------------------------------------------------------------------


@dataclass
class Totals:
    """What an export file holds: entries, events, cancellations, and per type the exact sum
    of the events' quantities (cancelled ones included: the file holds them)."""

    entries: int = 0
    events: int = 0
    cancellations: int = 0
    sums: dict[str, Decimal] = field(default_factory=dict)

    def add(self, entry: Mapping[str, Any]) -> None:
        self.entries += 1
        if entry.get("kind", "event") == "cancellation":
            self.cancellations += 1
            return
        self.events += 1
        kind = str(entry.get("type"))
        with localcontext(EXACT):
            self.sums[kind] = self.sums.get(kind, Decimal(0)) + _exact(entry.get("quantity"))

    def as_json(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "events": self.events,
            "cancellations": self.cancellations,
            "sums": {kind: canonical_decimal(total) for kind, total in sorted(self.sums.items())},
        }

    @classmethod
    def of_json(cls, data: Mapping[str, Any]) -> Totals:
        sums = {str(kind): Decimal(total) for kind, total in data["sums"].items()}
        return cls(int(data["entries"]), int(data["events"]), int(data["cancellations"]), sums)


@dataclass
class Checkpoint:
    """The cursor file: the cursor after the last entry written, the length of the output
    up to and including that entry (`offset`), and what the output then holds. Saved after
    the entry's bytes are on disk, so it never names data the output lacks."""

    format: str
    filters: dict[str, str]
    cursor: str | None = None
    offset: int = 0
    totals: Totals = field(default_factory=Totals)
    # After Tally's log was rewound under the output (`--on-rewind resume`): where to read
    # from while no entry has been written since (`cursor` stays the last line's), and the
    # length of the output then, whose entries are never written again.
    resume: str | None = None
    dedupe_below: int | None = None

    @property
    def read_from(self) -> str | None:
        """The cursor the next export starts from."""
        return self.resume or self.cursor

    def as_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "filters": self.filters,
            "cursor": self.cursor,
            "offset": self.offset,
            "totals": self.totals.as_json(),
            "resume": self.resume,
            "dedupe_below": self.dedupe_below,
        }

    def save(self, path: Path) -> None:
        """Atomically: a complete new file replaces the old one, or the old one stays.

        The temporary file is synced before the rename, so the name never points at a file
        whose bytes a crash lost. The directory is not synced: if a power loss undoes the
        rename, the previous checkpoint is back, which names an earlier entry whose bytes are
        on disk too; resuming from it truncates the output to it and fetches again from there.
        """
        # One name: a kill leaves at most this one file, which the next save replaces.
        temporary = path.with_name(f".{path.name}.tmp")
        with temporary.open("w", encoding="utf-8") as file:
            file.write(json.dumps(self.as_json()) + "\n")
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Raises CommandError when the file is not a cursor file `tally export` wrote."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                format=str(data["format"]),
                filters={str(k): str(v) for k, v in data["filters"].items()},
                cursor=None if data["cursor"] is None else str(data["cursor"]),
                offset=int(data["offset"]),
                totals=Totals.of_json(data["totals"]),
                resume=None if data.get("resume") is None else str(data["resume"]),
                dedupe_below=None
                if data.get("dedupe_below") is None
                else int(data["dedupe_below"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CommandError(
                "invalid-input",
                f"{path} is not a cursor file written by tally export.",
                exit_code=2,
            ) from None


def _encode(entry: Mapping[str, Any], cursor: str, form: str) -> bytes:
    """One entry as a line of the output, carrying the cursor that resumes after it."""
    if form == "ndjson":
        return b"".join(ndjson_lines([{**entry, "cursor": cursor}], decimals_as_numbers=True))
    row = {**entry, "kind": entry.get("kind", "event"), "cursor": cursor}
    lines = csv_lines(CSV_COLUMNS, [row])
    next(lines)  # the header, written once at the start of the file
    return b"".join(lines)


def _lines_before(file: BinaryIO, end: int) -> Iterator[bytes]:
    """The lines of `file` in its first `end` bytes (`end` is at a line's end), read one at a
    time from the start: a file of any size in bounded memory."""
    file.seek(0)
    read = 0
    for line in file:
        if read >= end:
            return
        read += len(line)
        yield line


def _identity(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    """An entry's identity in the log: (kind, application, id)."""
    return (
        str(entry.get("kind") or "event"),
        str(entry.get("application", "")),
        str(entry.get("id", "")),
    )


def _csv_header() -> bytes:
    return next(csv_lines(CSV_COLUMNS, []))


def _last_line(file: BinaryIO, end: int) -> bytes:
    """The line that ends at `end` (its newline included), read backwards in chunks."""
    start, chunk = end - 1, 1 << 16
    found = b""
    while start > 0:
        begin = max(0, start - chunk)
        file.seek(begin)
        found = file.read(start - begin) + found
        newline = found.rfind(b"\n")
        if newline >= 0:
            found = found[newline + 1 :]
            break
        start = begin
    file.seek(end - 1)
    return found + file.read(1)


def _cursor_of_line(line: bytes, form: str) -> str | None:
    try:
        if form == "ndjson":
            cursor = json.loads(line).get("cursor")
        else:
            cursor = next(csv.reader([line.decode("utf-8")]))[-1]
    except (ValueError, StopIteration, AttributeError):
        return None
    return cursor if isinstance(cursor, str) else None


class Interrupts:
    """SIGINT and SIGTERM end the export, but never in the middle of writing an entry and its
    checkpoint: there, the signal is noted and acted on right after. Elsewhere (waiting for
    Tally, sleeping between polls) it ends the export at once."""

    def __init__(self) -> None:
        self.pending = False
        self._critical = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        del number, frame
        if self._critical:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[Interrupts]:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        try:
            yield self
        finally:
            for signalled, handler in self._previous.items():
                signal.signal(signalled, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self.pending:
            raise KeyboardInterrupt


class ExportFile:
    """The output file and its cursor file, kept consistent across kills.

    Each entry is written as one line (NDJSON) or row (CSV) that carries its cursor. Entries
    are committed in groups (`commit`: at most COMMIT_ENTRIES or COMMIT_SECONDS apart, and
    before every wait and exit): the lines are flushed and fsynced, and only then is the
    cursor file replaced, naming the last one's cursor and the output's length after it (one
    fsync pair per entry held a consumer to about 150 entries a second). A kill at any point
    leaves the cursor file naming an entry whose bytes are in the output, possibly followed
    by bytes the cursor file does not count: torn lines, or whole lines written since the
    last commit. `open` truncates the output to the cursor file's `offset`, which drops
    exactly those, and checks that the line ending there carries the saved cursor; the export
    then resumes after that entry: no gap, no repeat.
    """

    def __init__(self, out_path: Path, cursor_path: Path, form: str, filters: dict[str, str]):
        self.path = out_path
        self.cursor_path = cursor_path
        self.form = form
        self.dropped = 0  # bytes of a torn tail dropped by open()
        self._pending: list[bytes] = []  # encoded entries not yet committed
        self._pending_cursor: str | None = None
        self._pending_since = 0.0
        self._pending_resume: str | None = None  # after entries skipped since the last line
        resuming = cursor_path.exists()
        if resuming:
            self.checkpoint = Checkpoint.load(cursor_path)
            self._check_resumable(filters)
        elif out_path.exists() and out_path.stat().st_size > 0:
            raise CommandError(
                "invalid-input",
                f"{out_path} already holds data but {cursor_path} does not exist: "
                "give the cursor file it was written with, or another --out.",
                exit_code=2,
            )
        else:
            self.checkpoint = Checkpoint(format=form, filters=filters)
        # Opened without truncating: nothing is cut before the checks below have passed.
        self._file: BinaryIO = out_path.open("r+b" if out_path.exists() else "w+b")
        try:
            self._lock()
            if resuming:
                self._cut_to_checkpoint()
            else:
                # The cursor file first: from now on every restart knows where the output
                # starts.
                self.checkpoint.save(cursor_path)
            if self.checkpoint.offset == 0 and form == "csv":
                self._append(_csv_header())
                self.checkpoint.save(cursor_path)
            self._written = self._identities(self.checkpoint.dedupe_below or 0)
        except BaseException:
            self._file.close()
            raise
        self._pending_totals = copy.deepcopy(self.checkpoint.totals)

    def _identities(self, end: int) -> set[tuple[str, str, str]]:
        """(kind, application, id) of every entry in the first `end` bytes of the output."""
        if end == 0:
            return set()
        try:
            text = (line.decode("utf-8") for line in _lines_before(self._file, end))
            if self.form == "ndjson":
                rows: Iterator[Mapping[str, Any]] = (json.loads(line) for line in text)
            else:
                rows = csv.DictReader(text)
            return {_identity(row) for row in rows}
        finally:
            self._file.seek(self.checkpoint.offset)

    def rewound(self, resume_cursor: str) -> None:
        """Tally's log was rewound under this output (restored from a backup): read on from
        `resume_cursor`, and never write again an entry the output holds already."""
        self.commit()
        self.checkpoint.resume = resume_cursor
        self.checkpoint.dedupe_below = self.checkpoint.offset
        self.checkpoint.save(self.cursor_path)
        self._written = self._identities(self.checkpoint.offset)

    def _lock(self) -> None:
        """Hold the output for this process: a second export into it (a cron job and a
        person, say) would interleave entries and checkpoints. Released when it closes."""
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CommandError(
                "conflict", f"Another tally export is writing {self.path}.", exit_code=1
            ) from None

    def _cut_to_checkpoint(self) -> None:
        """Truncate the output to the cursor file's offset, once sure it is this output's."""
        size = self._file.seek(0, os.SEEK_END)
        if size < self.checkpoint.offset:
            raise CommandError(
                "invalid-input",
                f"{self.path} is shorter than {self.cursor_path} says it was written: "
                "entries it counts are gone, so it cannot be resumed without a gap.",
                exit_code=2,
            )
        self._check_tail()
        self.dropped = size - self.checkpoint.offset
        self._file.truncate(self.checkpoint.offset)
        self._file.seek(self.checkpoint.offset)

    def _check_resumable(self, filters: dict[str, str]) -> None:
        saved = self.checkpoint
        if saved.format != self.form:
            raise CommandError(
                "invalid-input",
                f"{self.cursor_path} belongs to a {saved.format} export; this one is {self.form}.",
                exit_code=2,
            )
        if saved.filters != filters:
            # A cursor resumes only the export it came from, with the same filters.
            raise CommandError(
                "invalid-input",
                f"{self.cursor_path} belongs to an export with other filters.",
                details=[f"{name}: {value}" for name, value in saved.filters.items()]
                or ["(no filters)"],
                exit_code=2,
            )
        if not self.path.exists():
            raise CommandError(
                "invalid-input",
                f"{self.cursor_path} counts entries in {self.path}, which does not exist.",
                exit_code=2,
            )

    def _check_tail(self) -> None:
        if self.checkpoint.totals.entries == 0:
            return
        line = _last_line(self._file, self.checkpoint.offset)
        if not line.endswith(b"\n") or _cursor_of_line(line, self.form) != self.checkpoint.cursor:
            raise CommandError(
                "invalid-input",
                f"{self.path} does not end where {self.cursor_path} says: it was changed "
                "since, or the cursor file belongs to another output.",
                exit_code=2,
            )

    def _append(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.checkpoint.offset += len(data)

    def write(self, entry: Mapping[str, Any], cursor: str) -> bool:
        """Append `entry`; the next `commit` saves `cursor` as the place to resume after it
        (`write` commits by itself when the group is full or old enough). False, writing
        nothing, for an entry the output held when Tally's log was rewound under it."""
        if not self._pending and self._pending_resume is None:
            self._pending_since = time.monotonic()
        if self._written and _identity(entry) in self._written:
            self._pending_resume = cursor
            self._commit_when_due()
            return False
        self._pending.append(_encode(entry, cursor, self.form))
        self._pending_cursor = cursor
        self._pending_resume = None
        self._pending_totals.add(entry)
        self._commit_when_due()
        return True

    def _commit_when_due(self) -> None:
        if (
            len(self._pending) >= COMMIT_ENTRIES
            or time.monotonic() - self._pending_since >= COMMIT_SECONDS
        ):
            self.commit()

    def commit(self) -> None:
        """Put the written entries on disk, then name the last one in the cursor file (and
        where to read on, when entries were skipped after it)."""
        if not self._pending and self._pending_resume is None:
            return
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()  # a failed write is never retried after the bytes it left
            self._append(data)
            self.checkpoint.cursor = self._pending_cursor
            self.checkpoint.resume = None
        if self._pending_resume is not None:
            self.checkpoint.resume, self._pending_resume = self._pending_resume, None
        self.checkpoint.totals = self._pending_totals
        self.checkpoint.save(self.cursor_path)
        self._pending_totals = copy.deepcopy(self.checkpoint.totals)

    def close(self) -> None:
        """Commit what is written, then release the output."""
        try:
            self.commit()
        finally:
            self._file.close()


def _progress(enabled: bool) -> Progress | None:
    """A live line on a terminal: how many entries, and the time of the latest one."""
    if not enabled:
        return None
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.completed:,} entries written"),
        TextColumn("[dim]{task.fields[latest]}"),
        TimeElapsedColumn(),
        console=out,
        transient=True,
    )


def export(
    *,
    url: UrlOption,
    key: KeyOption,
    out_file: Annotated[Path, typer.Option("--out", help="The file to write (or resume).")],
    form: Annotated[
        str, typer.Option("--format", help="ndjson (one entry a line) or csv (RFC 4180).")
    ] = "ndjson",
    cursor_file: Annotated[
        Path | None,
        typer.Option(help="Where the cursor is saved (default: OUT.cursor)."),
    ] = None,
    follow: Annotated[
        bool, typer.Option(help="Keep polling for new entries until stopped.")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 5.0,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's entries.")] = None,
    application: Annotated[str | None, typer.Option(help="Only this application's.")] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", help="Only events of this type.")
    ] = None,
    subject: Annotated[str | None, typer.Option(help="Only events of this subject.")] = None,
    time_from: Annotated[str | None, typer.Option(help="Event time >= this (RFC 3339).")] = None,
    time_to: Annotated[str | None, typer.Option(help="Event time < this (RFC 3339).")] = None,
    received_from: Annotated[str | None, typer.Option(help="Received >= this (RFC 3339).")] = None,
    received_to: Annotated[str | None, typer.Option(help="Received < this (RFC 3339).")] = None,
    kind: Annotated[str | None, typer.Option(help="event or cancellation.")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Entries per request (the export's limit).")
    ] = None,
    on_rewind: Annotated[
        str,
        typer.Option(
            help="When Tally's log was restored to before this file's end (409 "
            "log-rewound): stop, or resume from the point both agree on, never writing an "
            "entry the file holds again."
        ),
    ] = "stop",
    deadline: DeadlineOption = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Write every export entry to a file, resumably: rerun the same command after any
    interruption and it continues after the last entry written, none twice, none missing.
    With --follow, keeps polling until SIGINT or SIGTERM (then exits 0); stopped so without
    --follow, it exits 1."""
    if form not in FORMATS:
        raise CommandError("usage", "--format must be ndjson or csv.", exit_code=2)
    if on_rewind not in ("stop", "resume"):
        raise CommandError("usage", "--on-rewind must be stop or resume.", exit_code=2)
    given = {
        "tenant": tenant,
        "application": application,
        "type": event_type,
        "subject": subject,
        "time_from": time_from,
        "time_to": time_to,
        "received_from": received_from,
        "received_to": received_to,
        "kind": kind,
        "limit": None if limit is None else str(limit),
    }
    filters = {name: value for name, value in given.items() if value is not None}
    cursors = cursor_file or out_file.with_name(out_file.name + ".cursor")
    interrupts = Interrupts()
    written, interrupted = 0, False
    with connected(url, key, deadline) as tally, interrupts.installed():
        target = ExportFile(out_file, cursors, form, filters)
        progress = _progress(sys.stdout.isatty() and not as_json)
        try:
            with progress or _nothing():
                task = progress.add_task("export", total=None, latest="") if progress else None

                def advanced(entry: Mapping[str, Any]) -> None:
                    if progress is not None and task is not None:
                        progress.update(task, advance=1, latest=entry.get("received_at", ""))

                while True:
                    passed, rewound = _export_pass(
                        tally.export(cursor=target.checkpoint.read_from, **filters),
                        target,
                        interrupts,
                        advanced,
                        resume_rewound=on_rewind == "resume",
                    )
                    written += passed
                    if rewound:
                        continue  # again, from where the file and the log agree
                    with interrupts.deferred():
                        target.commit()
                    if not follow:
                        break
                    time.sleep(interval)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            target.close()
    totals = target.checkpoint.totals
    report_totals = totals.as_json()
    report = {
        "out": str(out_file),
        "cursor_file": str(cursors),
        "written": written,
        "dropped_bytes": target.dropped,
        "interrupted": interrupted,
        "cursor": target.checkpoint.cursor,
        "totals": report_totals,
    }
    sums = report_totals["sums"]
    rows = [{"type": kind, "sum": total} for kind, total in sums.items()]
    stopped = " (stopped)" if interrupted else ""
    text = (
        f"{written} entries written to {out_file}{stopped}; it holds {totals.entries} "
        f"({totals.events} events, {totals.cancellations} cancellations)."
    )
    if target.dropped:
        text += f" A torn tail of {target.dropped} bytes was dropped first."
    emit(report, as_json=as_json, text=text)
    if rows and not as_json:
        out.print(table_of(rows, ["type", "sum"])())
    if interrupted and not follow:
        raise typer.Exit(1)  # stopped before the end: a script must not take it as complete


def _export_pass(
    entries: Iterator[tuple[dict[str, Any], str]],
    target: ExportFile,
    interrupts: Interrupts,
    advanced: Callable[[Mapping[str, Any]], None],
    *,
    resume_rewound: bool,
) -> tuple[int, bool]:
    """Write `entries` to `target`: how many were written, and whether Tally's log was found
    rewound under the output, so that, with `resume_rewound`, the export goes on from where
    the two agree (LogRewound raises otherwise)."""
    written = 0
    try:
        for entry, cursor in _entries(entries):
            with interrupts.deferred():
                if not target.write(entry, cursor):
                    continue
            written += 1
            advanced(entry)
    except LogRewound as rewound:
        if not resume_rewound or rewound.resume_cursor is None:
            raise
        with interrupts.deferred():
            target.rewound(rewound.resume_cursor)
        err.print(
            f"Tally's log was restored to before the end of {target.path}: resuming from "
            "where both agree, without writing again the entries the file holds."
        )
        return written, True
    return written, False


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _entries(export: Iterator[tuple[dict[str, Any], str]]) -> Iterator[tuple[dict[str, Any], str]]:
    """The SDK's export, with a cursor it refuses (an edited cursor file) as a CLI error."""
    try:
        yield from export
    except ValueError as error:
        raise CommandError(
            "invalid-input", f"The saved cursor is refused: {error}.", exit_code=2
        ) from None


# --- tally usage -----------------------------------------------------------------------------


def usage(
    *,
    url: UrlOption,
    key: KeyOption,
    from_: FromOption,
    to: ToOption,
    window: Annotated[str | None, typer.Option(help="minute, hour, day or month.")] = None,
    tz: Annotated[str | None, typer.Option(help="IANA time zone of the windows [UTC].")] = None,
    aggregation: Annotated[
        str | None, typer.Option(help="sum, count, min, max, latest, unique_count.")
    ] = None,
    unique_of: Annotated[
        str | None, typer.Option(help="With unique_count: subject or attributes.KEY.")
    ] = None,
    group_by: Annotated[
        list[str] | None,
        typer.Option(help="tenant, type, subject, application, attributes.KEY; repeatable."),
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    application: Annotated[str | None, typer.Option(help="Only this application.")] = None,
    event_type: Annotated[str | None, typer.Option("--type", help="Only this type.")] = None,
    subject: Annotated[str | None, typer.Option(help="Only this subject.")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (RFC 4180).")] = False,
    deadline: DeadlineOption = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Usage over [--from, --to): one row per window and group, as GET /v1/usage."""
    filters = {"tenant": tenant, "application": application, "type": event_type, "subject": subject}
    with connected(url, key, deadline) as tally:
        answer = tally.usage(
            from_=from_,
            to=to,
            window=window,
            tz=tz,
            aggregation=aggregation,
            unique_of=unique_of,
            group_by=group_by or (),
            **{name: value for name, value in filters.items() if value is not None},
        )
    keys = list(group_by or [])
    rows = [
        {
            "window_start": row.get("window_start"),
            "window_end": row.get("window_end"),
            **{name: (row.get("group") or {}).get(name) for name in keys},
            "value": row.get("value"),
        }
        for row in answer.get("rows", [])
    ]
    columns = ["window_start", "window_end", *keys, "value"]
    if as_csv and not as_json:
        for line in csv_lines(columns, rows):
            sys.stdout.write(line.decode())
        return
    # For people, a window is named by its start (its end follows from --window), which
    # keeps the table within 80 columns; JSON and CSV keep both.
    for row in rows:
        row["window"] = row.pop("window_start")
    shown = ["window", *keys, "value"] if answer.get("window") else [*keys, "value"]
    emit(answer, as_json=as_json, table=table_of(rows, shown))


# --- tally reconcile ---------------------------------------------------------------------------


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise CommandError(
            "usage", f"--tz: {name!r} is not an IANA time zone such as Europe/Berlin.", exit_code=2
        ) from None


def period_of(moment: datetime, period: str, zone: tzinfo) -> tuple[datetime, datetime]:
    """The period `[start, end)` of `period` in `zone` that holds `moment`, both in UTC. Days
    and months start at local midnight, so a day across a daylight-saving change has 23 or 25
    hours; hours are local clock hours."""
    local = moment.astimezone(zone)
    if period == "hour":
        start = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        return start, start + timedelta(hours=1)
    if period == "day":
        day = local.date()
        following = day + timedelta(days=1)
    else:
        day = local.date().replace(day=1)
        following = (day + timedelta(days=32)).replace(day=1)
    start = datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)
    end = datetime(following.year, following.month, following.day, tzinfo=zone).astimezone(UTC)
    return start, end


@dataclass
class Figures:
    """One (tenant, type, period) as the file or Tally has it."""

    count: int = 0
    sum: Decimal = Decimal(0)
    cancelled_count: int = 0
    cancelled_sum: Decimal = Decimal(0)
    digest: str = field(default_factory=lambda: DigestAccumulator().hexdigest())

    def as_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": canonical_decimal(self.sum),
            "cancelled": {
                "count": self.cancelled_count,
                "sum": canonical_decimal(self.cancelled_sum),
            },
            "digest": self.digest,
        }

    def differences(self, other: Figures) -> list[str]:
        pairs = [
            ("count", self.count, other.count),
            ("sum", self.sum, other.sum),
            ("cancelled.count", self.cancelled_count, other.cancelled_count),
            ("cancelled.sum", self.cancelled_sum, other.cancelled_sum),
            ("digest", self.digest, other.digest),
        ]
        return [name for name, mine, theirs in pairs if mine != theirs]


class EntryFile:
    """The entries of a file `tally export` wrote (or the server's NDJSON/CSV export saved
    as is, or its JSON pages one to a line): NDJSON when its name ends in .ndjson, .jsonl or
    .json, CSV for .csv, else by its first character. The export's end line
    (`{"next_cursor", "has_more"}`) and CSV end row (`kind` = `end`) are left out, and so is
    each entry's `cursor`: they are not entries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        suffix = path.suffix.lower()
        if suffix in (".ndjson", ".jsonl", ".json"):
            self.form = "ndjson"
        elif suffix == ".csv":
            self.form = "csv"
        else:
            try:
                with path.open("rb") as file:
                    head = file.read(4096).lstrip()
            except OSError as error:
                raise self._unreadable(error) from None
            self.form = "ndjson" if head.startswith(b"{") else "csv"

    def _unreadable(self, error: OSError) -> CommandError:
        return CommandError(
            "invalid-input", f"Cannot read {self.path}: {error.strerror}.", exit_code=2
        )

    def bad(self, line: int, why: str) -> CommandError:
        return CommandError("invalid-input", f"{self.path}, line {line}: {why}.", exit_code=2)

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, entry) for each entry. Raises CommandError naming the line of one
        that is not an entry."""
        try:
            with self.path.open(encoding="utf-8", newline="") as file:
                if self.form == "ndjson":
                    yield from self._ndjson(file)
                else:
                    yield from self._csv(file)
        except OSError as error:
            raise self._unreadable(error) from None
        except UnicodeDecodeError:
            raise CommandError(
                "invalid-input", f"{self.path} is not UTF-8 text.", exit_code=2
            ) from None

    def _ndjson(self, file: Any) -> Iterator[tuple[int, dict[str, Any]]]:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                # Exact numbers: attribute values of 40 digits must hash as they were sent.
                entry = json.loads(line, parse_float=Decimal)
            except ValueError:
                raise self.bad(
                    number, "not a JSON object (a torn last line? resume the export)"
                ) from None
            if not isinstance(entry, dict):
                raise self.bad(number, "not a JSON object")
            if "next_cursor" in entry and "id" not in entry:
                # The stream's end line, or a JSON page of the export saved one to a line.
                for item in entry.get("events") or []:
                    if not isinstance(item, dict):
                        raise self.bad(number, "an item of its events is not an object")
                    yield number, item
                continue
            entry.pop("cursor", None)
            yield number, entry

    def _csv(self, file: Any) -> Iterator[tuple[int, dict[str, Any]]]:
        reader = csv.DictReader(file)
        missing = {"id", "application", "tenant"} - set(reader.fieldnames or [])
        if missing:
            raise self.bad(1, f"no {', '.join(sorted(missing))} column: not an export's CSV")
        for row in reader:
            number = reader.line_num
            kind = row.get("kind") or "event"
            if kind == "end":
                continue
            entry: dict[str, Any] = {
                name: value
                for name, value in row.items()
                if name is not None and name not in ("cursor", "attributes") and value != ""
            }
            entry["kind"] = kind
            if kind == "event":
                for name in ("subject", "unit"):
                    entry.setdefault(name, None)
                entry["shredded"] = row.get("shredded") == "true"
                # `true`, or the JSON of a `{"at", "reason"}` object: cancelled either way.
                entry["cancelled"] = row.get("cancelled") not in (None, "", "false", "null")
                text = row.get("attributes") or ""
                try:
                    attributes = json.loads(text, parse_float=Decimal) if text else None
                except ValueError:
                    raise self.bad(number, "its attributes are not JSON") from None
                entry["attributes"] = (
                    {} if attributes is None and not entry["shredded"] else attributes
                )
            yield number, entry


def _read_file(
    source: EntryFile,
    *,
    tenant: str | None,
    start: datetime,
    end: datetime,
    period: str,
    zone: tzinfo,
) -> tuple[dict[tuple[str, str, datetime], Figures], dict[tuple[str, str, datetime], datetime]]:
    """The file's figures per (tenant, type, period start), and each period's end. Two
    passes, so memory holds the cancelled identities and one accumulator per period, never
    the events: the first finds the cancellations (which come after their events in the log),
    the second adds each event of the range to its period."""
    cancelled: set[tuple[Any, Any]] = set()
    for _, entry in source:
        if entry.get("kind", "event") == "cancellation":
            cancelled.add((entry.get("application"), entry.get("id")))
    figures: dict[tuple[str, str, datetime], Figures] = {}
    digests: dict[tuple[str, str, datetime], DigestAccumulator] = {}
    ends: dict[tuple[str, str, datetime], datetime] = {}
    for number, entry in source:
        kind = entry.get("kind", "event")
        if kind == "cancellation":
            continue
        if kind != "event":
            raise source.bad(number, "its kind is neither event nor cancellation")
        if tenant is not None and entry.get("tenant") != tenant:
            continue
        try:
            moment = datetime.fromisoformat(canonical_time(entry.get("time")))
            quantity = _exact(entry.get("quantity"))
            is_cancelled = bool(entry.get("cancelled")) or (
                (entry.get("application"), entry.get("id")) in cancelled
            )
            if not start <= moment < end:
                continue
            begins, ends_at = period_of(moment, period, zone)
            key = (str(entry.get("tenant")), str(entry.get("type")), begins)
            # The digest's own accumulator, as reconciliation_digest uses it: the file's
            # digest is Tally's definition, never a second one.
            digests.setdefault(key, DigestAccumulator()).add(entry, is_cancelled)
        except InvalidInput as error:
            raise source.bad(number, error.detail.rstrip(".")) from None
        ends[key] = ends_at
        row = figures.setdefault(key, Figures())
        with localcontext(EXACT):
            if is_cancelled:
                row.cancelled_count += 1
                row.cancelled_sum += quantity
            else:
                row.count += 1
                row.sum += quantity
    for key, accumulator in digests.items():
        figures[key].digest = accumulator.hexdigest()
    return figures, ends


def _tally_figures(
    answer: Mapping[str, Any],
) -> tuple[dict[tuple[str, str, datetime], Figures], dict[tuple[str, str, datetime], datetime]]:
    figures: dict[tuple[str, str, datetime], Figures] = {}
    ends: dict[tuple[str, str, datetime], datetime] = {}
    try:
        for row in answer["rows"]:
            begins = datetime.fromisoformat(row["period_start"]).astimezone(UTC)
            key = (str(row["tenant"]), str(row["type"]), begins)
            ends[key] = datetime.fromisoformat(row["period_end"]).astimezone(UTC)
            cancelled = row.get("cancelled") or {}
            figures[key] = Figures(
                count=int(row["count"]),
                sum=_exact(str(row["sum"])),
                cancelled_count=int(cancelled.get("count", 0)),
                cancelled_sum=_exact(str(cancelled.get("sum", "0"))),
                digest=str(row["digest"]),
            )
    except (KeyError, TypeError, ValueError, InvalidInput):
        raise CommandError(
            "failed", "Tally's reconciliation answer is not in the documented shape."
        ) from None
    return figures, ends


def reconcile(
    *,
    url: UrlOption,
    key: KeyOption,
    verify: Annotated[Path, typer.Option(help="The exported file to check (NDJSON or CSV).")],
    from_: FromOption,
    to: ToOption,
    period: Annotated[str, typer.Option(help="hour, day or month.")] = "day",
    tz: Annotated[str, typer.Option(help="IANA time zone of the periods.")] = "UTC",
    tenant: Annotated[
        str | None, typer.Option(help="The tenant to reconcile [all the key sees].")
    ] = None,
    deadline: DeadlineOption = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Check an exported file against Tally: per tenant, type and period, its count, sum,
    cancellations and digest recomputed from the file against GET /v1/reconciliation.
    Exits 1 when any period differs or is on one side only."""
    if period not in ("hour", "day", "month"):
        raise CommandError("usage", "--period must be hour, day or month.", exit_code=2)
    if from_ > to:
        raise CommandError("usage", "--from is after --to.", exit_code=2)
    zone = _zone(tz)
    source = EntryFile(verify)
    mine, my_ends = _read_file(source, tenant=tenant, start=from_, end=to, period=period, zone=zone)
    with connected(url, key, deadline) as tally:
        answer = tally.reconciliation(tenant=tenant, from_=from_, to=to, period=period, tz=tz)
    theirs, their_ends = _tally_figures(answer)
    periods: list[dict[str, Any]] = []
    for key_ in sorted(set(mine) | set(theirs), key=lambda k: (k[2], k[0], k[1])):
        begins = key_[2]
        ends = their_ends.get(key_) or my_ends[key_]
        in_file, in_tally = mine.get(key_), theirs.get(key_)
        differs = (in_file or Figures()).differences(in_tally or Figures())
        if in_tally is None and differs:
            status = "only-in-file"
        elif in_file is None and differs:
            status = "only-in-tally"
        else:
            status = "differs" if differs else "match"
        periods.append(
            {
                "tenant": key_[0],
                "type": key_[1],
                "period_start": begins.astimezone(zone).isoformat(),
                "period_end": ends.astimezone(zone).isoformat(),
                "status": status,
                "differs": differs,
                "file": (in_file or Figures()).as_json(),
                "tally": (in_tally or Figures()).as_json(),
            }
        )
    bad = [p for p in periods if p["status"] != "match"]
    report = {
        "file": str(verify),
        "tenant": tenant,
        "from": from_.isoformat(),
        "to": to.isoformat(),
        "period": period,
        "tz": tz,
        "matches": not bad,
        "periods": periods,
    }
    rows = [
        {
            "period": _period_label(p["period_start"], period),
            "tenant": p["tenant"],
            "type": p["type"],
            "count": f"{p['file']['count']}/{p['tally']['count']}",
            "sum": p["file"]["sum"]
            if p["file"]["sum"] == p["tally"]["sum"]
            else f"{p['file']['sum']}/{p['tally']['sum']}",
            "result": _verdict(p),
        }
        for p in periods
    ]
    if as_json:
        emit(report, as_json=True)
    else:
        if rows:
            columns = ["period", "type", "count", "sum", "result"]
            if tenant is None:
                columns.insert(1, "tenant")
            out.print(table_of(rows, columns)())
        plural = "" if len(periods) == 1 else "s"
        summary = f"{len(periods)} period{plural}, {len(periods) - len(bad)} matching"
        if bad:
            summary += f", {len(bad)} not (figures as file/Tally above)"
        out.print(f"{summary}.")
    if bad:
        raise typer.Exit(1)


def _period_label(start: str, period: str) -> str:
    """A period by its local start, as short as names it: 2026-03 for a month, 2026-03-01
    for a day, 2026-03-01T10:00+01:00 for an hour (a zone's repeated hour needs the offset)."""
    if period == "month":
        return start[:7]
    if period == "day":
        return start[:10]
    return start[:16] + start[19:]


def _verdict(period: Mapping[str, Any]) -> str:
    status = period["status"]
    if status == "match":
        return "match"
    if status == "only-in-file":
        return "only in the file"
    if status == "only-in-tally":
        return "only in Tally"
    return "differs: " + ", ".join(period["differs"])


def register(app: typer.Typer) -> None:
    """Add the billing commands to `app`."""
    app.command("export")(export)
    app.command("usage")(usage)
    app.command("reconcile")(reconcile)
