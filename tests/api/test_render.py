"""The one layer that writes JSON, NDJSON and CSV, and chooses between them by Accept."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal

import pytest

from tally.api.render import CSV, JSON, NDJSON, csv_lines, ndjson_lines, negotiate
from tally.errors import NotAcceptable

OFFERED = (JSON, NDJSON, CSV)


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("application/x-ndjson", NDJSON),
        ("text/csv", CSV),
        ("text/*", CSV),
        ("text/csv;q=0.5, application/x-ndjson;q=0.9", NDJSON),
        ("application/json;q=0.1, text/csv", CSV),
        ("text/html, */*;q=0.1", JSON),
        ("TEXT/CSV; charset=utf-8", CSV),
        ("application/*;q=0.8, text/csv;q=0.8", CSV),  # equal q: the more specific range
    ],
)
def test_accept_picks_the_preferred_offered_format(accept: str | None, chosen: str) -> None:
    assert negotiate(accept, OFFERED) == chosen


@pytest.mark.parametrize("accept", ["text/html", "application/xml", "text/csv;q=0, image/*"])
def test_an_accept_that_rules_out_every_format_is_refused(accept: str) -> None:
    with pytest.raises(NotAcceptable) as refused:
        negotiate(accept, OFFERED)
    assert refused.value.errors[0].parameter == "Accept"


def test_csv_is_rfc_4180_and_reads_back_with_the_csv_module() -> None:
    rows = [
        {"kind": "event", "id": 'a,"b"', "quantity": Decimal("0.10"), "attributes": {"k": "v"}},
        {"kind": "event", "id": "line\nbreak", "quantity": Decimal(3), "subject": None},
        {"kind": "end", "cursor": "c1"},
    ]
    columns = ["kind", "id", "quantity", "subject", "attributes", "cursor"]
    text = b"".join(csv_lines(columns, rows)).decode()

    assert text.startswith("kind,id,quantity,subject,attributes,cursor\r\n")
    read = list(csv.DictReader(io.StringIO(text, newline="")))
    assert read[0]["id"] == 'a,"b"'
    assert read[0]["quantity"] == "0.10"
    assert json.loads(read[0]["attributes"]) == {"k": "v"}
    assert read[1]["id"] == "line\nbreak"
    assert read[1]["subject"] == ""
    assert read[2] == {**dict.fromkeys(columns, ""), "kind": "end", "cursor": "c1"}


def test_ndjson_writes_one_document_per_line_and_decimals_exactly() -> None:
    lines = list(ndjson_lines([{"quantity": Decimal("1E-18")}, '{"already":"json"}']))
    assert lines == [b'{"quantity":"0.000000000000000001"}\n', b'{"already":"json"}\n']
