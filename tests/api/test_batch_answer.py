"""A batch's answer is written out by hand for events without errors (api/events.py
`_batch_body`): its bytes must be what json.dumps writes for the same answer."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tally.api.events import _batch_body
from tally.api.problems import field_errors
from tally.errors import FieldError
from tally.services.ingest import EventResult, IngestReport

PREFIX = "/events/{}"

# Ids as the answer echoes them: any encodable text (no lone surrogates), or none.
_IDS = st.none() | st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_RESULTS = st.lists(
    st.tuples(
        _IDS,
        st.sampled_from(["accepted", "duplicate", "rejected"]),
        st.lists(st.sampled_from(["/id", "/time", "/attributes/ü"]), max_size=2),
    ),
    min_size=1,
    max_size=8,
)


def _reference(report: IngestReport) -> bytes:
    """The answer as it was built before: a dict per event, one json.dumps."""
    events: list[dict[str, Any]] = []
    for result in report.results:
        item: dict[str, Any] = {"index": result.index, "id": result.id, "status": result.status}
        if result.errors:
            item["errors"] = field_errors(
                [e.under(PREFIX.format(result.index)) for e in result.errors]
            )
        events.append(item)
    body = {
        "accepted": report.count("accepted"),
        "duplicates": report.count("duplicate"),
        "rejected": report.count("rejected"),
        "events": events,
    }
    return json.dumps(body, ensure_ascii=False).encode()


@given(_RESULTS)
def test_the_answer_is_what_json_dumps_writes(
    results: list[tuple[str | None, str, list[str]]],
) -> None:
    report = IngestReport(
        [
            EventResult(
                index=index,
                id=sent,
                status=status,
                errors=[FieldError(pointer, "is wrong") for pointer in pointers],
            )
            for index, (sent, status, pointers) in enumerate(results)
        ]
    )
    answer = _batch_body(report, PREFIX, lambda error: error)
    assert answer == _reference(report)
    assert json.loads(answer)["events"][0]["index"] == 0
