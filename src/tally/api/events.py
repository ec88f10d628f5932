"""POST /v1/events (ingestion) and GET /v1/events (export)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from tally.api.deps import PrincipalDep, ServicesDep, known_query_only
from tally.api.problems import field_errors, responses
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
from tally.events.log import ExportFilter
from tally.events.validation import (
    EventDraft,
    EventId,
    EventType,
    Name,
    Rfc3339,
    Text,
    is_encodable,
    parse_json,
    validate_cloudevent,
    validate_event,
)
from tally.ratelimit.http import note_of
from tally.ratelimit.policy import RateNote
from tally.services.ingest import Candidate, IngestReport

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
    kind, *parameters = request.headers.get("content-type", "").split(";")
    kind = kind.strip().lower()
    if kind not in accepted:
        raise UnsupportedMediaType(
            f"Send {' or '.join(accepted)}.", [FieldError("", "unsupported Content-Type")]
        )
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            raise UnsupportedMediaType(
                "Send the body in UTF-8: charset=utf-8, or no charset.",
                [FieldError("", "unsupported charset")],
            )
    return kind


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


def ingest_body(
    services: Services, principal: Principal, kind: str, body: bytes, note: RateNote
) -> tuple[bool, str, IngestReport]:
    """Parse, validate and ingest a body: (is_batch, pointer prefix, report).

    Raises RateLimited, storing nothing, when the batch's events are over a key or tenant limit.
    """
    batch, prefix, raws = split(kind, parse_json(body), services.settings.max_batch_events)
    check = validate_cloudevent if kind in (CLOUDEVENT, CLOUDEVENT_BATCH) else validate_event
    candidates: list[Candidate] = [check(raw) for raw in raws]
    tenants = [c.tenant for c in candidates if isinstance(c, EventDraft)]
    services.rate_limits.admit_events(principal, events=len(raws), tenants=tenants, note=note)
    ids = [_sent_id(raw) for raw in raws]
    return batch, prefix, services.ingest.ingest(principal, candidates, ids)


def _batch_body(report: IngestReport, prefix: str) -> bytes:
    events = []
    for result in report.results:
        item: dict[str, Any] = {"index": result.index, "id": result.id, "status": result.status}
        if result.errors:
            where = prefix.format(result.index)
            item["errors"] = field_errors([e.under(where) for e in result.errors])
        events.append(item)
    body = {
        "accepted": report.count("accepted"),
        "duplicates": report.count("duplicate"),
        "rejected": report.count("rejected"),
        "events": events,
    }
    return json.dumps(body, ensure_ascii=False).encode()


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
    openapi_extra={"requestBody": ingest_body_schema()},
)
async def post_events(request: Request, principal: PrincipalDep, services: ServicesDep) -> Response:
    """A batch answers 200 with an outcome per event; a single event answers as itself.

    200 means every accepted event is committed durably. Retrying the same request is safe:
    events already stored come back as `duplicate`.
    """
    principal.require(Scope.EVENTS_WRITE)
    kind = media_type(request)
    body = await read_body(request)
    # Parsing and validating up to 1 MiB is CPU work: it runs in the worker thread that then
    # waits for the commit, not on the event loop.
    batch, prefix, report = await run_in_threadpool(
        ingest_body, services, principal, kind, body, note_of(request)
    )
    if batch:
        return Response(_batch_body(report, prefix), media_type=JSON)
    result = report.results[0]
    if result.status == "rejected":
        if result.forbidden:
            raise Forbidden("This key may not report events for this tenant.")
        if result.conflict:
            raise Conflict("This id already holds other content; see errors.", result.errors)
        raise InvalidInput("The event is invalid; see errors.", result.errors)
    return Response(json.dumps({"id": result.id, "status": result.status}), media_type=JSON)


@router.get(
    "/v1/events",
    name="list_events",
    summary="Export events, page by page, with a cursor",
    response_model=ExportPageOut,
)
def get_events(
    *,
    principal: PrincipalDep,
    services: ServicesDep,
    cursor: Annotated[
        str | None,
        Query(min_length=1, max_length=2048, description="From next_cursor; omit to start"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    tenant: Annotated[Name | None, Query()] = None,
    application: Annotated[Name | None, Query()] = None,
    type: Annotated[EventType | None, Query()] = None,
    subject: Annotated[Text | None, Query()] = None,
    time_from: Annotated[Rfc3339 | None, Query(description="Event time >= this")] = None,
    time_to: Annotated[Rfc3339 | None, Query(description="Event time < this")] = None,
) -> Response:
    """Every committed event matching the filters, exactly once, to a reader that follows
    `next_cursor`: until `has_more` is false, then by polling with the last cursor."""
    if time_from is not None and time_to is not None and time_from > time_to:
        raise InvalidInput(
            "time_from is after time_to.",
            [FieldError("", "must not be after time_to", parameter="time_from")],
        )
    filters = ExportFilter(
        tenant=tenant,
        application=application,
        type=type,
        subject=subject,
        time_from=time_from,
        time_to=time_to,
    )
    page = services.export.page(principal, filters, cursor=cursor, limit=limit)
    events = ",".join(event.to_json() for event in page.events)
    tail = json.dumps({"next_cursor": page.next_cursor, "has_more": page.has_more})
    return Response(f'{{"events":[{events}],{tail[1:]}', media_type=JSON)


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
