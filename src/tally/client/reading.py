"""The reading half: the export with resumable cursors, usage, reconciliation and meters."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx

from tally.client.errors import TallyError
from tally.client.events import rfc3339
from tally.client.transport import RetryPolicy, Transport

NDJSON = "application/x-ndjson"
Entry = dict[str, Any]
Params = dict[str, str | list[str]]
# Cursors the SDK writes for a place inside a JSON page start with this; Tally's own are
# base64url, which never holds a '~'.
_COMPOSITE = "sdk1~"


def query(params: Mapping[str, Any]) -> Params:
    """Query parameters as Tally reads them: datetimes as RFC 3339, booleans as true/false,
    sequences repeated (`group_by=a&group_by=b`), None left out. A trailing `_` is dropped,
    so `from_=` sends `from`."""
    built: Params = {}
    for given, value in params.items():
        if value is None:
            continue
        name = given.removesuffix("_")
        if isinstance(value, list | tuple):
            built[name] = [_text(v) for v in value]
        else:
            built[name] = _text(value)
    return built


def _text(value: object) -> str:
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _identity(entry: Mapping[str, Any]) -> bytes:
    """An entry's identity in the log, (application, id, kind), as 8 bytes: enough to tell
    apart the at most one page of entries a composite cursor remembers."""
    key = json.dumps([entry.get("application"), entry.get("id"), entry.get("kind", "event")])
    return hashlib.sha256(key.encode()).digest()[:8]


def composite_cursor(page_cursor: str | None, seen: Sequence[bytes]) -> str:
    payload = json.dumps({"c": page_cursor, "s": base64.b64encode(b"".join(seen)).decode()})
    return _COMPOSITE + base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()


def parse_cursor(cursor: str | None) -> tuple[str | None, set[bytes]]:
    """(Tally's cursor, identities already seen after it) of a cursor from `Export`.

    Raises ValueError for a composite cursor that was altered.
    """
    if cursor is None or not cursor.startswith(_COMPOSITE):
        return cursor, set()
    text = cursor.removeprefix(_COMPOSITE)
    try:
        payload = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        seen = base64.b64decode(payload["s"], validate=True)
        inner = payload["c"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ValueError("the cursor is not one the SDK wrote") from None
    if not (inner is None or isinstance(inner, str)) or len(seen) % 8:
        raise ValueError("the cursor is not one the SDK wrote")
    return inner, {seen[i : i + 8] for i in range(0, len(seen), 8)}


class Export(Iterator[tuple[Entry, str]]):
    """Every export entry matching the filters from a cursor, as `(entry, cursor)`: `cursor`
    resumes right after `entry` (pass it as `export(cursor=…)` with the same filters). The
    iteration ends when Tally has no more; `.cursor` is then the one to poll with later (it is
    also there before any entry: the cursor the export started from).

    From Tally's NDJSON stream the cursor is the line's own. From JSON pages (a server without
    the stream) a cursor inside a page is one the SDK composes: the page's starting cursor and
    the identities already yielded from that page, which resuming skips; so in both cases a
    resumed export yields each entry once, with no gap. A stream cut short is resumed from its
    last cursor, within the retry policy.
    """

    def __init__(
        self,
        transport: Transport,
        policy: RetryPolicy,
        cursor: str | None,
        filters: Params,
    ) -> None:
        self._transport = transport
        self._policy = policy
        self._filters = filters
        self.cursor = cursor
        self._ended = False
        self._entries = self._generate()

    def __iter__(self) -> Export:
        return self

    def __next__(self) -> tuple[Entry, str]:
        return next(self._entries)

    def _generate(self) -> Iterator[tuple[Entry, str]]:
        server_cursor, skip = parse_cursor(self.cursor)
        cuts = 0
        stalled_since = time.monotonic()
        while True:
            params: Params = dict(self._filters)
            if server_cursor is not None:
                params["cursor"] = server_cursor
            response = self._transport.request(
                "GET",
                "/v1/events",
                policy=self._policy,
                params=params,
                headers={"Accept": f"{NDJSON}, application/json;q=0.5"},
                stream=True,
            )
            try:
                kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if kind == NDJSON:
                    lines = self._stream(response, skip)
                else:
                    response.read()
                    lines = self._page(
                        json.loads(response.content, parse_float=Decimal), server_cursor, skip
                    )
                before = self.cursor
                done = yield from lines
            finally:
                response.close()
            if done:
                return
            if kind == NDJSON and not self._ended:
                # Cut before its end line: resume from the last complete line, with backoff,
                # until the stream makes no progress for the policy's deadline.
                if self.cursor != before:
                    cuts, stalled_since = 0, time.monotonic()
                elif time.monotonic() - stalled_since > self._policy.deadline:
                    raise TallyError(
                        None, {"title": "The export stream kept breaking off", "detail": ""}
                    )
                time.sleep(self._policy.backoff(cuts))
                cuts += 1
            server_cursor, skip = parse_cursor(self.cursor)

    def _stream(
        self, response: httpx.Response, skip: set[bytes]
    ) -> Generator[tuple[Entry, str], None, bool]:
        """Lines of an NDJSON answer; returns True at an end line with has_more false, and
        notes in `_ended` whether the end line came."""
        self._ended = False
        try:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                item = json.loads(line, parse_float=Decimal)
                if "next_cursor" in item and "cursor" not in item:
                    self.cursor = item["next_cursor"]
                    self._ended = True
                    return not item.get("has_more", False)
                cursor = item.pop("cursor")
                self.cursor = cursor
                if _identity(item) not in skip:
                    yield item, cursor
        except (httpx.TransportError, ValueError):
            pass  # cut, or a partial last line: resumed from the last complete line's cursor
        return False

    def _page(
        self, page: Mapping[str, Any], start: str | None, skip: set[bytes]
    ) -> Generator[tuple[Entry, str], None, bool]:
        entries = [e for e in page["events"] if _identity(e) not in skip]
        seen = sorted(skip)
        for position, entry in enumerate(entries):
            if position == len(entries) - 1:
                self.cursor = page["next_cursor"]
            else:
                seen.append(_identity(entry))
                self.cursor = composite_cursor(start, seen)
            yield entry, self.cursor
        self.cursor = page["next_cursor"]
        return not page["has_more"]


Call = Callable[..., Any]


class Meters:
    """`/v1/meters`: saved usage queries (admin to create and delete)."""

    def __init__(self, call: Call) -> None:
        self._call = call

    def list(self) -> list[dict[str, Any]]:
        answer = self._call("GET", "/v1/meters")
        meters = answer.get("meters", answer) if isinstance(answer, dict) else answer
        if not isinstance(meters, list):
            raise TallyError(200, {"title": "Unexpected answer", "detail": "no list of meters"})
        return meters

    def get(self, meter_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("GET", f"/v1/meters/{_segment(meter_id)}")
        return answer

    def create(
        self,
        *,
        id: str,
        type: str,
        aggregation: str,
        group_by: Sequence[str] | None = None,
        filters: Mapping[str, Any] | None = None,
        unit: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"id": id, "type": type, "aggregation": aggregation}
        if group_by is not None:
            body["group_by"] = list(group_by)
        if filters is not None:
            body["filters"] = dict(filters)
        if unit is not None:
            body["unit"] = unit
        answer: dict[str, Any] = self._call("POST", "/v1/meters", body=body)
        return answer

    def delete(self, meter_id: str) -> None:
        self._call("DELETE", f"/v1/meters/{_segment(meter_id)}")

    def usage(
        self,
        meter_id: str,
        *,
        tenant: str | None = None,
        from_: datetime | str | None = None,
        to: datetime | str | None = None,
        window: str | None = None,
        tz: str | None = None,
    ) -> dict[str, Any]:
        """`GET /v1/meters/{id}/usage`: the meter's usage, shaped as `Client.usage`'s."""
        params = query({"tenant": tenant, "from": from_, "to": to, "window": window, "tz": tz})
        answer: dict[str, Any] = self._call(
            "GET", f"/v1/meters/{_segment(meter_id)}/usage", params=params
        )
        return answer


def _segment(text: str) -> str:
    """One path segment, percent-encoded ('/', '?' and '#' included)."""
    return quote(text, safe="")
