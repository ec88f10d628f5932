"""POST /v1/events (ingestion) and GET /v1/events (export)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from functools import partial
from json.encoder import encode_basestring
from typing import Annotated, Any, Literal
from urllib.parse import unquote_to_bytes

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from tally.api.deps import PrincipalDep, ServicesDep, known_query_only
from tally.api.problems import field_errors, responses
from tally.api.render import CSV, NDJSON, csv_chunks, ndjson_chunks, negotiate
from tally.api.schemas import INGEST_ANSWER, ExportedEvent, ExportPageOut, ingest_body_schema
from tally.auth.service import Principal, Scope
from tally.bootstrap import Services
from tally.errors import (
    Conflict,
    FieldError,
    Forbidden,
    InvalidInput,
    UnsupportedMediaType,
)
from tally.events.log import EXPORT_CSV_COLUMNS, ExportFilter, Opened, row_fields, row_json
from tally.events.validation import (
    CloudEventIn,
    EventDraft,
    EventId,
    EventType,
    Name,
    Rfc3339,
    Text,
    is_encodable,
    is_utf8_charset,
    media_type_of,
    parse_json,
    validate_cloudevent,
    validate_event,
)
from tally.gil import handing_off
from tally.ratelimit.http import note_of
from tally.ratelimit.policy import RateNote
from tally.services.export import Streamed
from tally.services.ingest import Candidate, IngestReport

log = structlog.get_logger(__name__)

router = APIRouter(tags=["events"], dependencies=[Depends(known_query_only)])

JSON = "application/json"
CLOUDEVENT = "application/cloudevents+json"
CLOUDEVENT_BATCH = "application/cloudevents-batch+json"


async def read_body(request: Request) -> bytes:
    """The body, decoded from gzip if it was sent so (api/encoding.py: 415 for another coding,
    400 for corrupt gzip). Its size, after decoding, and the time it may take are bounded for
    every route by the middleware (api/middleware.py, api/encoding.py), which answers 413 and
    408 from inside this read. Its text is judged by `parse_json`, strictly as UTF-8."""
    try:
        return await request.body()
    except ClientDisconnect:
        # A client that gave up (a timeout, a closed socket) is not a fault of Tally's.
        raise InvalidInput(
            "The client closed the connection before the body was complete."
        ) from None


EVENT_TYPES = (JSON, CLOUDEVENT, CLOUDEVENT_BATCH)


def media_type(request: Request, accepted: tuple[str, ...] = EVENT_TYPES) -> str:
    """The body's media type, without parameters: one of `accepted`. Raises
    UnsupportedMediaType (415) for a type the route does not read, or a `charset` other than
    UTF-8 (the only one JSON bodies may use, RFC 8259 section 8.1)."""
    kind, parameters = media_type_of(request.headers.get("content-type", ""))
    if kind not in accepted:
        raise UnsupportedMediaType(
            f"Send {' or '.join(accepted)}.", [FieldError("", "unsupported Content-Type")]
        )
    if not is_utf8_charset(parameters):
        raise UnsupportedMediaType(
            "Send the body in UTF-8: charset=utf-8, or no charset.",
            [FieldError("", "unsupported charset")],
        )
    return kind


# A binary-mode CloudEvent (CloudEvents HTTP binding 1.0, section 3.1) carries its attributes
# as `ce-` headers and its data as the body; `ce-specversion` is what marks the mode.
CE_PREFIX = "ce-"
CE_HEADERS = {
    "specversion": "The CloudEvents version, `1.0`: marks a binary-mode CloudEvent, whose "
    "attributes are these `ce-` headers (values percent-encoded UTF-8, as the CloudEvents HTTP "
    "binding says) and whose data is the application/json body (the schema CloudEventData).",
    "id": "The event's id (binary mode).",
    "source": "The event's source (binary mode; required, not stored).",
    "type": "The event's type (binary mode).",
    "time": "The event's time, RFC 3339 with an offset (binary mode).",
    "subject": "The event's subject (binary mode).",
}


def _header_schema(name: str) -> dict[str, Any]:
    """The schema of CloudEventIn's attribute `name`, which its `ce-` header carries: one
    source for both modes. A header is absent rather than null."""
    schema: dict[str, Any] = CloudEventIn.model_json_schema()["properties"][name]
    branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
    found = {k: v for k, v in branches[0].items() if k not in ("title", "default")}
    # openapi-python-client generates no operation with a constant or a date-time header
    # ("Literal['1.0'] | Unset is not allowed in header"): a pattern says the same.
    if "const" in found:
        found["pattern"] = f"^{re.escape(found.pop('const'))}$"
    found.pop("format", None)
    return found


def binary_cloudevent(request: Request) -> dict[str, str] | None:
    """The attributes of a binary-mode CloudEvent, from its `ce-*` headers (percent-decoded
    as UTF-8) and `datacontenttype` from Content-Type when there is one; None when the
    request is in another mode. Raises InvalidInput, naming the header, for one that is sent
    twice or does not decode."""
    if f"{CE_PREFIX}specversion" not in request.headers:
        return None
    attributes: dict[str, str] = {}
    if "content-type" in request.headers:
        attributes["datacontenttype"] = request.headers["content-type"]
    for name, value in request.headers.items():  # names come lower-case
        if not name.startswith(CE_PREFIX) or name == CE_PREFIX:
            continue
        attribute = name.removeprefix(CE_PREFIX)
        if attribute in attributes:
            raise InvalidInput(
                f"The {name} header is sent more than once.",
                [FieldError("", "is sent more than once", parameter=name)],
            )
        try:
            # Headers arrive as Latin-1 text; the binding percent-encodes what is not ASCII.
            attributes[attribute] = unquote_to_bytes(value.encode("latin-1")).decode()
        except UnicodeDecodeError:
            raise InvalidInput(
                f"The {name} header is not percent-encoded UTF-8.",
                [FieldError("", "is not percent-encoded UTF-8", parameter=name)],
            ) from None
    return attributes


# The fields of a CloudEvent's data. The service names them as a native event does
# (`/tenant`): in a CloudEvent they are under `/data`, in binary mode the body itself.
_DATA_FIELDS = frozenset({"tenant", "quantity", "unit", "attributes"})


def _locator(kind: str, binary: bool) -> Callable[[FieldError], FieldError]:
    """How an event's errors (pointers into the event as validated) are shown to the sender:
    as they are for a native event, with `/data` for a CloudEvent's data, and for a
    binary-mode one at the header or the body's member that held the value."""

    def locate(error: FieldError) -> FieldError:
        tokens = error.pointer.split("/")[1:]  # still escaped: joined back as they were
        if tokens and tokens[0] in _DATA_FIELDS:
            tokens = ["data", *tokens]
        if not binary:
            return FieldError("".join(f"/{t}" for t in tokens), error.detail)
        if not tokens or tokens[0] == "data":
            return FieldError("".join(f"/{t}" for t in tokens[1:]), error.detail)
        header = "Content-Type" if tokens[0] == "datacontenttype" else CE_PREFIX + tokens[0]
        return FieldError("", error.detail, parameter=header)

    if kind == JSON and not binary:
        return lambda error: error
    return locate


def _sent_id(raw: object) -> str | None:
    if isinstance(raw, dict):
        value = raw.get("id")
        # Echoed in the answer, so it must be encodable: a lone surrogate is not.
        if isinstance(value, str) and len(value) <= 128 and is_encodable(value):
            return value
    return None


def _items(parsed: object, pointer: str, maximum: int) -> list[Any]:
    if not isinstance(parsed, list):
        raise InvalidInput(
            "A batch must be a JSON array.", [FieldError(pointer, "must be an array")]
        )
    if not 1 <= len(parsed) <= maximum:
        detail = f"must hold 1 to {maximum} events"
        raise InvalidInput(f"A batch {detail}.", [FieldError(pointer, detail)])
    return parsed


def split(kind: str, parsed: object, maximum: int) -> tuple[bool, str, list[Any]]:
    """(is_batch, pointer prefix of event i as a format string, raw events) of a body."""
    if kind == CLOUDEVENT_BATCH:
        return True, "/{}", _items(parsed, "", maximum)
    if kind == JSON and isinstance(parsed, dict) and "events" in parsed:
        extra = sorted(set(parsed) - {"events"})
        if extra:
            raise InvalidInput(
                "A batch object holds only 'events'.",
                [FieldError(f"/{name}", "is not a field of a batch") for name in extra],
            )
        return True, "/events/{}", _items(parsed["events"], "/events", maximum)
    if not isinstance(parsed, dict):
        raise InvalidInput(
            'The body must be an event object or {"events": [...]}.',
            [FieldError("", "must be a JSON object")],
        )
    return False, "", [parsed]


def parse_ingest(
    services: Services,
    principal: Principal,
    kind: str,
    body: bytes,
    note: RateNote,
    *,
    binary: dict[str, str] | None = None,
) -> tuple[bool, str, list[Candidate], list[str | None]]:
    """Parse and validate a body, and charge its events to the rate limits: (is_batch,
    pointer prefix, candidates, ids as sent). With `binary` (`binary_cloudevent`'s
    attributes), the body is the data of that one CloudEvent, which is validated as a
    structured one would be.

    Raises RateLimited, storing nothing, when the batch's events are over a key or tenant limit.
    """
    parsed = parse_json(body)
    if binary is not None:
        batch, prefix, raws = False, "", [{**binary, "data": parsed}]
    else:
        batch, prefix, raws = split(kind, parsed, services.settings.max_batch_events)
    cloudevents = binary is not None or kind in (CLOUDEVENT, CLOUDEVENT_BATCH)
    check = validate_cloudevent if cloudevents else validate_event
    candidates: list[Candidate] = [check(raw) for raw in handing_off(raws)]
    tenants = [c.tenant for c in candidates if isinstance(c, EventDraft)]
    services.rate_limits.admit_events(principal, events=len(raws), tenants=tenants, note=note)
    return batch, prefix, candidates, [_sent_id(raw) for raw in raws]


# A body up to this size is parsed, judged and sealed on the event loop, which then awaits
# its commit: well under a millisecond of work. A larger one (up to TALLY_MAX_BODY_BYTES and
# max_batch_events) goes to a worker thread, so that it does not hold up the small requests
# the loop is serving meanwhile.
INLINE_BODY_BYTES = 32 * 1024


async def ingest_request(
    services: Services,
    principal: Principal,
    kind: str,
    body: bytes,
    note: RateNote,
    *,
    binary: dict[str, str] | None = None,
) -> tuple[bool, str, IngestReport]:
    """`parse_ingest`, then ingest: (is_batch, pointer prefix, report). A small body on the
    event loop, which awaits the commit; a large one in a worker thread, which waits for it.
    A limiter that is not in this process (Redis) is asked from a worker thread too."""
    parse = partial(parse_ingest, services, principal, kind, body, note, binary=binary)
    if len(body) <= INLINE_BODY_BYTES and services.rate_limits.local:
        batch, prefix, candidates, ids = parse()
        return batch, prefix, await services.ingest.ingest_async(principal, candidates, ids)

    def in_thread() -> tuple[bool, str, IngestReport]:
        batch, prefix, candidates, ids = parse()
        return batch, prefix, services.ingest.ingest(principal, candidates, ids)

    return await asyncio.to_thread(in_thread)


def _batch_body(
    report: IngestReport, prefix: str, locate: Callable[[FieldError], FieldError]
) -> bytes:
    """The answer to a batch: the counts, then each event's outcome in the order sent. What
    json.dumps writes (its default separators, text unescaped), an event without errors
    written out directly: one is built per event of every batch."""
    items = []
    for result in report.results:
        if result.errors:
            where = prefix.format(result.index)
            item: dict[str, Any] = {
                "index": result.index,
                "id": result.id,
                "status": result.status,
                "errors": field_errors([locate(e).under(where) for e in result.errors]),
            }
            items.append(json.dumps(item, ensure_ascii=False))
        else:
            sent = "null" if result.id is None else encode_basestring(result.id)
            items.append(f'{{"index": {result.index}, "id": {sent}, "status": "{result.status}"}}')
    counts = json.dumps(
        {
            "accepted": report.count("accepted"),
            "duplicates": report.count("duplicate"),
            "rejected": report.count("rejected"),
        }
    )
    return f'{counts[:-1]}, "events": [{", ".join(items)}]}}'.encode()


@router.post(
    "/v1/events",
    summary="Report billable events (one, a batch, or CloudEvents)",
    response_model=None,
    responses={
        **INGEST_ANSWER,
        **responses(
            (409, "A single event whose id holds other content (ERR-VAL-409)"),
            (413, "The body is over the size limit (1 MiB by default; ERR-VAL-400)"),
            (415, "Not one of the three content types, or an unsupported Content-Encoding"),
            (429, "Over a request or event rate limit of the key or a tenant; nothing stored"),
        ),
    },
    openapi_extra={
        "requestBody": ingest_body_schema(),
        "parameters": [
            {
                "name": f"{CE_PREFIX}{name}",
                "in": "header",
                "required": False,
                "description": description,
                "schema": _header_schema(name),
            }
            for name, description in CE_HEADERS.items()
        ],
    },
)
async def post_events(request: Request, principal: PrincipalDep, services: ServicesDep) -> Response:
    """A batch answers 200 with an outcome per event; a single event answers as itself.

    200 means every accepted event is committed durably. Retrying the same request is safe:
    events already stored come back as `duplicate`.
    """
    return await answer_post_events(request, principal, services)


async def answer_post_events(
    request: Request, principal: Principal, services: Services
) -> Response:
    """What `post_events` answers; also served by api/fastpath.py, which calls it without
    FastAPI's routing."""
    principal.require(Scope.EVENTS_WRITE)
    binary = binary_cloudevent(request)
    # Without Content-Type, a binary-mode event's data is JSON: the CloudEvents JSON format's
    # default, and what the SDK sends for an event without datacontenttype.
    implicit = binary is not None and "content-type" not in request.headers
    kind = JSON if implicit else media_type(request)
    if binary is not None and kind != JSON:
        raise UnsupportedMediaType(
            "A binary-mode CloudEvent (ce-specversion) carries its data as application/json.",
            [FieldError("", "unsupported Content-Type")],
        )
    body = await read_body(request)
    batch, prefix, report = await ingest_request(
        services, principal, kind, body, note_of(request), binary=binary
    )
    locate = _locator(kind, binary is not None)
    if batch:
        return Response(_batch_body(report, prefix, locate), media_type=JSON)
    result = report.results[0]
    errors = [locate(e) for e in result.errors]
    if result.status == "rejected":
        if result.forbidden:
            raise Forbidden("This key may not report events for this tenant.")
        if result.conflict:
            raise Conflict("This id already holds other content; see errors.", errors)
        raise InvalidInput("The event is invalid; see errors.", errors)
    return Response(json.dumps({"id": result.id, "status": result.status}), media_type=JSON)


_FORMATS = (JSON, NDJSON, CSV)

CSV_COLUMNS = EXPORT_CSV_COLUMNS


def _range(low: object, high: object, names: tuple[str, str]) -> None:
    if low is not None and high is not None and low > high:  # type: ignore[operator]
        raise InvalidInput(
            f"{names[0]} is after {names[1]}.",
            [FieldError("", f"must not be after {names[1]}", parameter=names[0])],
        )


def _ndjson_line(entry: Opened | None, cursor: str) -> str:
    if entry is None:
        return json.dumps({"next_cursor": cursor, "has_more": False})
    # A cursor is URL-safe base64: its JSON string is itself in quotes.
    return row_json(*entry, f',"cursor":"{cursor}"')


def _csv_row(entry: Opened | None, cursor: str) -> dict[str, Any]:
    if entry is None:
        return {"kind": "end", "cursor": cursor}
    # Attributes as their JSON text as stored; empty if shredded.
    row = row_fields(*entry)
    row["cursor"] = cursor
    return row


def _cut_when_failing(entries: Iterator[Streamed]) -> Iterator[Streamed]:
    """`entries` until one fails to read: then the stream ends there, without its end line
    or row, which is how a reader tells a cut stream from a finished one (the status line,
    200, went out with the first byte). The failure is logged like any other."""
    try:
        yield from entries
    except Exception as error:  # noqa: BLE001 - every failure ends the stream the same way
        log.error("export_stream_cut", error_type=type(error).__name__)


@router.get(
    "/v1/events",
    name="list_events",
    summary="Export events and cancellations: pages with a cursor, or one NDJSON or CSV stream",
    response_model=ExportPageOut,
    responses={
        200: {
            "description": (
                "JSON: one page. `application/x-ndjson`: every entry from the cursor on, "
                "one per line with the `cursor` that resumes after it, then an end line "
                '`{"next_cursor", "has_more": false}`. `text/csv`: a header, a row per '
                "entry with its `cursor`, then a row of kind `end` with the cursor to poll "
                "with. A stream without its end line or row was cut: resume from the last "
                "complete one's cursor."
            ),
            "content": {
                NDJSON: {"schema": {"type": "string"}},
                CSV: {"schema": {"type": "string"}},
            },
        },
        **responses(
            (406, "Accept names none of application/json, NDJSON or CSV"),
            (
                409,
                "The cursor is ahead of the log: a restore rewound it (type log-rewound). "
                "Continue with the problem's `resume_cursor`; entries read after that point "
                "may come again, to be deduplicated by (application, id)",
            ),
        ),
    },
)
def get_events(
    *,
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    cursor: Annotated[
        str | None,
        Query(min_length=1, max_length=2048, description="From next_cursor; omit to start"),
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=10_000, description="A page's size; in a stream, each read's")
    ] = 1000,
    tenant: Annotated[Name | None, Query()] = None,
    application: Annotated[Name | None, Query()] = None,
    type: Annotated[EventType | None, Query()] = None,
    subject: Annotated[Text | None, Query()] = None,
    time_from: Annotated[Rfc3339 | None, Query(description="Event time >= this")] = None,
    time_to: Annotated[Rfc3339 | None, Query(description="Event time < this")] = None,
    received_from: Annotated[
        Rfc3339 | None, Query(description="The entry's received_at >= this")
    ] = None,
    received_to: Annotated[
        Rfc3339 | None, Query(description="The entry's received_at < this")
    ] = None,
    kind: Annotated[
        Literal["event", "cancellation"] | None, Query(description="Only entries of this kind")
    ] = None,
) -> Response:
    """Every committed entry matching the filters, exactly once, to a reader that follows
    `next_cursor`: until `has_more` is false, then by polling with the last cursor. A
    cancellation matches the event filters through the event it cancels."""
    form = negotiate(request.headers.get("accept"), _FORMATS)
    _range(time_from, time_to, ("time_from", "time_to"))
    _range(received_from, received_to, ("received_from", "received_to"))
    filters = ExportFilter(
        tenant=tenant,
        application=application,
        type=type,
        subject=subject,
        time_from=time_from,
        time_to=time_to,
        kind=kind,
        received_from=received_from,
        received_to=received_to,
    )
    if form == JSON:
        page = services.export.page(principal, filters, cursor=cursor, limit=limit)
        events = ",".join([row_json(row, opened) for row, opened in page.events])
        tail = json.dumps({"next_cursor": page.next_cursor, "has_more": page.has_more})
        return Response(f'{{"events":[{events}],{tail[1:]}', media_type=JSON)
    entries = _cut_when_failing(
        services.export.stream(principal, filters, cursor=cursor, limit=limit)
    )
    # One chunk per read (a page of `limit` entries): a write per line would cost more than
    # the line.
    if form == NDJSON:
        body = ndjson_chunks(
            [_ndjson_line(entry, after) for entry, after in handing_off(read)] for read in entries
        )
    else:
        body = csv_chunks(
            CSV_COLUMNS,
            ([_csv_row(entry, after) for entry, after in handing_off(read)] for read in entries),
        )
    return StreamingResponse(body, media_type=form)


@router.get(
    "/v1/events/{application}/{event_id:path}",
    summary="One event by its identity",
    response_model=ExportedEvent,
    responses=responses(
        (404, "No such event among those the key may read; another tenant's is the same 404")
    ),
)
def get_event(
    principal: PrincipalDep, services: ServicesDep, application: Name, event_id: EventId
) -> Response:
    event = services.export.get(principal, application, event_id)
    return Response(event.to_json(), media_type=JSON)
