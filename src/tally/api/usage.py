"""GET /v1/usage (scope usage:read) and /v1/meters: usage aggregated by the database, and saved
usage queries answered by the same code (services/usage.py, docs/usage.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, StringConstraints
from starlette.status import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from tally.api.admin import ActorDep, body, body_doc
from tally.api.deps import PrincipalDep, ServicesDep, known_query_only
from tally.api.problems import responses
from tally.api.render import CSV, JSON, csv_lines, json_text, negotiate
from tally.events.validation import EventType, Name, Rfc3339, Text
from tally.services.usage import Definition, MeterSpec, Span, UsageAnswer, UsageRequest

router = APIRouter(tags=["usage"], dependencies=[Depends(known_query_only)])

Window = Literal["minute", "hour", "day", "month", "none"]
Aggregation = Literal["sum", "count", "min", "max", "latest", "unique_count"]
Zone = Annotated[
    str, Query(min_length=1, max_length=64, description="An IANA time zone, e.g. Europe/Berlin")
]
From = Annotated[Rfc3339, Query(alias="from", description="Event time >= this (RFC 3339)")]
To = Annotated[Rfc3339, Query(description="Event time < this (RFC 3339)")]
# A group-by key is checked by the service (naming group_by); the pattern says the same.
GroupKey = Annotated[
    str, StringConstraints(pattern=r"^(tenant|type|subject|application|attributes\.\S{1,64})$")
]
WindowQuery = Annotated[Window, Query(description="Windows in `tz`; none: one row per group")]


def span_of(time_from: From, to: To, window: WindowQuery = "none", tz: Zone = "UTC") -> Span:
    """The query parameters every usage answer takes: `from`, `to`, `window` and `tz`."""
    return Span(time_from=time_from, time_to=to, window=window, tz=tz)


SpanDep = Annotated[Span, Depends(span_of)]


class UsageRowOut(BaseModel):
    window_start: str
    window_end: str
    group: dict[str, Any]
    value: str | int


class UsageOut(BaseModel):
    """`value` is a decimal string for sum, min, max and latest, an integer for the counts."""

    from_: str = Field(alias="from")
    to: str
    window: str
    tz: str
    aggregation: str
    rows: list[UsageRowOut]


class MeterOut(BaseModel):
    id: str
    type: str
    aggregation: str
    unique_of: str | None
    group_by: list[str]
    filters: dict[str, Any]
    unit: str | None
    created_at: str


class MetersOut(BaseModel):
    meters: list[MeterOut]


_FORMATS = (JSON, CSV)
_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"content": {CSV: {"schema": {"type": "string", "description": "RFC 4180 CSV"}}}},
    **responses((406, "Accept names neither application/json nor text/csv")),
}


def answer(request: Request, found: UsageAnswer) -> Response:
    """The usage answer as JSON, or as CSV (`Accept: text/csv`): a header row, then one row
    per window and group, a column per field and per group key."""
    chosen = negotiate(request.headers.get("accept"), _FORMATS)
    if chosen == JSON:
        return Response(json_text(found.body), media_type=JSON)
    columns = ["window_start", "window_end", *found.group_by, "value"]
    rows = (
        {
            "window_start": r["window_start"],
            "window_end": r["window_end"],
            **r["group"],
            "value": r["value"],
        }
        for r in found.body["rows"]
    )
    return StreamingResponse(csv_lines(columns, rows), media_type=f"{CSV}; charset=utf-8")


@router.get("/v1/usage", response_model=UsageOut, responses=_ANSWERS)
def get_usage(
    *,
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    span: SpanDep,
    aggregation: Annotated[Aggregation, Query()] = "sum",
    unique_of: Annotated[
        str | None,
        Query(min_length=1, max_length=80, description="subject or attributes.KEY"),
    ] = None,
    group_by: Annotated[
        list[GroupKey],
        Query(description="tenant, type, subject, application or attributes.KEY; repeatable"),
    ] = [],  # noqa: B006 - FastAPI copies a Query default per request
    tenant: Annotated[Name | None, Query()] = None,
    application: Annotated[Name | None, Query()] = None,
    type: Annotated[EventType | None, Query()] = None,
    subject: Annotated[Text | None, Query()] = None,
) -> Response:
    """The events of `[from, to)` matching the filters, aggregated per window (in `tz`,
    daylight-saving changes included) and group by the database. Rows without events are
    left out; rows come in order of window, then group values (nulls last)."""
    found = services.usage.usage(
        principal,
        UsageRequest(
            span=span,
            definition=Definition(
                aggregation=aggregation, unique_of=unique_of, group_by=tuple(group_by)
            ),
            tenant=tenant,
            application=application,
            type=type,
            subject=subject,
        ),
    )
    return answer(request, found)


@router.post(
    "/v1/meters",
    status_code=HTTP_201_CREATED,
    responses=responses(
        (409, "The id is taken (ERR-VAL-409)"), (415, "The body is not application/json")
    ),
    openapi_extra=body_doc(MeterSpec),
)
def create_meter(
    spec: Annotated[MeterSpec, Depends(body(MeterSpec))], who: ActorDep, services: ServicesDep
) -> MeterOut:
    """Save a usage query under `id` (admin). Recorded in the audit log as `meter.create`."""
    return MeterOut(**services.usage.create_meter(spec, actor=who))


@router.get("/v1/meters")
def list_meters(principal: PrincipalDep, services: ServicesDep) -> MetersOut:
    """Every meter, by id (admin or usage:read)."""
    return MetersOut(meters=[MeterOut(**m) for m in services.usage.list_meters(principal)])


_METER = responses((404, "No such meter (ERR-RES-404)"))


@router.get("/v1/meters/{meter_id}", responses=_METER)
def get_meter(meter_id: Name, principal: PrincipalDep, services: ServicesDep) -> MeterOut:
    return MeterOut(**services.usage.get_meter(principal, meter_id))


@router.delete("/v1/meters/{meter_id}", status_code=HTTP_204_NO_CONTENT, responses=_METER)
def delete_meter(meter_id: Name, who: ActorDep, services: ServicesDep) -> Response:
    """Delete a meter (admin); the events stay. Recorded in the audit log as `meter.delete`."""
    services.usage.delete_meter(meter_id, actor=who)
    return Response(status_code=HTTP_204_NO_CONTENT)


@router.get(
    "/v1/meters/{meter_id}/usage",
    response_model=UsageOut,
    responses={**_ANSWERS, **_METER},
)
def get_meter_usage(
    *,
    request: Request,
    meter_id: Name,
    principal: PrincipalDep,
    services: ServicesDep,
    span: SpanDep,
    tenant: Annotated[Name | None, Query()] = None,
) -> Response:
    """The meter's usage: `/v1/usage` with the meter's type, aggregation, groups and filters,
    plus `meter` and `unit`."""
    found = services.usage.meter_usage(principal, meter_id, span=span, tenant=tenant)
    return answer(request, found)
