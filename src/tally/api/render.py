"""Output formats are renderers: one place chooses the format a reader asked for and writes rows
in it, so a route produces records once and never splices JSON, NDJSON or CSV by hand.

- `negotiate` reads `Accept` (RFC 9110 section 12.5.1: media ranges, `q` weights, `*/*`) and
  picks one of the formats a route offers, or raises NotAcceptable (406).
- `ndjson_lines` writes one JSON document per line (`application/x-ndjson`).
- `csv_lines` writes RFC 4180 CSV (`text/csv`): a header row, CRLF line ends, fields quoted
  when they hold a comma, quote, CR or LF; a value that is not a string is written as JSON
  (so a dict column is its JSON text, None is empty).

Each yields bytes as it goes, for a `StreamingResponse` that holds one row at a time.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

from tally.errors import FieldError, NotAcceptable
from tally.events.jsontext import exact_json

JSON = "application/json"
NDJSON = "application/x-ndjson"
CSV = "text/csv"


def _weighted(accept: str) -> list[tuple[float, int, str]]:
    """(q, specificity, media range) for each range of an Accept header; q 0 ranges dropped."""
    found: list[tuple[float, int, str]] = []
    for part in accept.split(","):
        kind, *parameters = part.split(";")
        kind = kind.strip().lower()
        if not kind:
            continue
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if not 0.0 < q <= 1.0:
            continue
        specificity = 0 if kind == "*/*" else 1 if kind.endswith("/*") else 2
        found.append((q, specificity, kind))
    return found


def _covers(media_range: str, media_type: str) -> bool:
    if media_range == "*/*":
        return True
    if media_range.endswith("/*"):
        return media_type.startswith(media_range[:-1])
    return media_range == media_type


def negotiate(accept: str | None, offered: Sequence[str]) -> str:
    """The format of `offered` (media types, the default first) that `accept` prefers.

    No Accept header, or an empty one, means the default. Among acceptable formats the highest
    `q` wins, then the more specific range, then the order of `offered`. Raises NotAcceptable
    (406) when `accept` rules every offered format out.
    """
    if not accept or not accept.strip():
        return offered[0]
    ranges = _weighted(accept)
    best: tuple[float, int, int] | None = None
    chosen: str | None = None
    for order, media_type in enumerate(offered):
        matches = [(q, s) for q, s, r in ranges if _covers(r, media_type)]
        if not matches:
            continue
        q, specificity = max(matches, key=lambda match: (match[1], match[0]))
        rank = (q, specificity, -order)
        if best is None or rank > best:
            best, chosen = rank, media_type
    if chosen is None:
        raise NotAcceptable(
            f"This route answers {', '.join(offered)}.",
            [FieldError("", "names no format this route answers", parameter="Accept")],
        )
    return chosen


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON")


def json_text(value: object, *, decimals_as_numbers: bool = False) -> str:
    """Compact JSON, UTF-8 as is. Decimals are exact strings (a figure Tally computed, such
    as a sum), or with `decimals_as_numbers` the exact numbers they were parsed from (a value
    a client sent, read back with `parse_float=Decimal`, such as a numeric attribute)."""
    if decimals_as_numbers:
        return exact_json(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def ndjson_chunks(groups: Iterable[Iterable[str]]) -> Iterator[bytes]:
    """One chunk of lines per group of JSON texts (never re-parsed): a stream written a
    page at a time goes out in one piece per page, not one per line."""
    for group in groups:
        text = "\n".join(group)
        if text:
            yield (text + "\n").encode()


def ndjson_lines(
    documents: Iterable[Mapping[str, Any] | str], *, decimals_as_numbers: bool = False
) -> Iterator[bytes]:
    """One line per document; a str is taken as JSON text already (never re-parsed)."""
    for document in documents:
        text = (
            document
            if isinstance(document, str)
            else json_text(document, decimals_as_numbers=decimals_as_numbers)
        )
        yield (text + "\n").encode()


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | Decimal):
        return json_text(value).strip('"')
    # A JSON column (attributes) keeps numbers as numbers.
    return json_text(value, decimals_as_numbers=True)


def csv_lines(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Iterator[bytes]:
    """A header of `columns`, then each row's values for them (missing ones empty)."""
    return csv_chunks(columns, ([row] for row in rows))


def csv_chunks(
    columns: Sequence[str], groups: Iterable[Iterable[Mapping[str, Any]]]
) -> Iterator[bytes]:
    """`csv_lines`, one chunk per group of rows (the header alone first)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def taken() -> bytes:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text.encode()

    writer.writerow(columns)
    yield taken()
    for group in groups:
        writer.writerows([_cell(row.get(column)) for column in columns] for row in group)
        chunk = taken()
        if chunk:
            yield chunk
