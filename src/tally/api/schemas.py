"""Response shapes, for the OpenAPI document (event pages are rendered by events/model.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tally.api.problems import Omitted, left_out
from tally.events.validation import EventIn, Text


class BatchIn(BaseModel):
    events: list[EventIn] = Field(min_length=1, max_length=1000)


class EventErrorOut(BaseModel):
    pointer: str = Field(description="JSON pointer into the request body, e.g. /events/17/time")
    detail: str


class EventOutcome(BaseModel):
    index: int
    id: str | None
    status: Literal["accepted", "duplicate", "rejected"]
    errors: list[EventErrorOut] | Omitted = Field(
        default=None, description="When rejected", json_schema_extra=left_out
    )


class BatchOut(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    events: list[EventOutcome]


class SingleOut(BaseModel):
    id: str
    status: Literal["accepted", "duplicate"]


class CancelIn(BaseModel):
    """The body of POST /v1/events/{application}/{id}/cancel."""

    model_config = ConfigDict(extra="forbid")

    reason: Text = Field(description="Why the event is withdrawn; sealed at rest, exported")


class CancelledOut(BaseModel):
    at: str = Field(description="RFC 3339, UTC: when the cancellation was received")
    reason: str | None = Field(description="null only when the tenant was shredded")


class ExportedEvent(BaseModel):
    kind: Literal["event"] = Field(description="An export entry's kind")
    id: str
    application: str
    tenant: str
    type: str
    quantity: str = Field(description="Exact decimal as a string, e.g. '0.3'")
    time: str = Field(description="RFC 3339, UTC")
    subject: str | None
    unit: str | None
    attributes: dict[str, str | float | bool] | None = Field(
        description="As sent; null only when the tenant was shredded (see `shredded`)"
    )
    region: str
    received_at: str = Field(description="RFC 3339, UTC: when Tally accepted the event")
    shredded: bool = Field(
        default=False,
        description=(
            "Present (true) only when the tenant's data key was destroyed: the event still "
            "counts, its attributes can never be read again"
        ),
    )
    cancelled: CancelledOut | Omitted = Field(
        default=None,
        description=(
            "On GET /v1/events/{application}/{id} of a cancelled event only; in the export "
            "the cancellation is an entry of its own"
        ),
        json_schema_extra=left_out,
    )


class Cancellation(BaseModel):
    """The cancellation of an event: an export-log entry of its own, after the event."""

    kind: Literal["cancellation"] = Field(description="An export entry's kind")
    application: str
    id: str = Field(description="The cancelled event's id")
    tenant: str
    reason: str | None = Field(description="As sent; null only when the tenant was shredded")
    received_at: str = Field(description="RFC 3339, UTC: when Tally received the cancellation")
    shredded: bool = Field(
        default=False,
        description="Present (true) only when the tenant's data key was destroyed",
    )


class ExportPageOut(BaseModel):
    events: list[ExportedEvent | Cancellation] = Field(
        description="The entries, both kinds (`kind`), in log order within each tenant"
    )
    next_cursor: str = Field(description="Opaque; pass back as `cursor` with the same filters")
    has_more: bool


def ingest_body_schema() -> dict[str, object]:
    """The requestBody of POST /v1/events for each accepted media type.

    Only application/json carries its `schema`; the CloudEvents media types name theirs
    (components' CloudEventIn and CloudEventBatchIn) in the description. openapi-python-client
    (0.29), the generator billing teams use, writes code for an operation with two or more
    body schemas that fails: a module that does not import (it names `Unset` without importing
    it) and `isinstance(body, list[...])` for an array body. Given one schema, it writes a
    client that works, and leaves the other media types out with a warning.
    """
    return {
        "required": True,
        "description": "`application/json`: one event (EventIn) or a batch (BatchIn); with "
        "a `ce-specversion` header, the data (CloudEventData) of one binary-mode CloudEvent. "
        "`application/cloudevents+json`: one CloudEvent (the schema CloudEventIn). "
        "`application/cloudevents-batch+json`: a JSON array of 1 to 1000 CloudEvents "
        "(the schema CloudEventBatchIn).",
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/EventIn"},
                        {"$ref": "#/components/schemas/BatchIn"},
                    ]
                }
            },
            "application/cloudevents+json": {},
            "application/cloudevents-batch+json": {},
        },
    }


CLOUDEVENT_BATCH_SCHEMA: dict[str, object] = {
    "title": "CloudEventBatchIn",
    "description": "The body of POST /v1/events as application/cloudevents-batch+json",
    "type": "array",
    "minItems": 1,
    "maxItems": 1000,
    "items": {"$ref": "#/components/schemas/CloudEventIn"},
}


# The 200 of POST /v1/events: a single event is answered as itself, a batch with an outcome
# per event (FastAPI's response_model can name only one of the two).
INGEST_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A single event's outcome, or a batch's outcome per event",
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/SingleOut"},
                        {"$ref": "#/components/schemas/BatchOut"},
                    ]
                }
            }
        },
    }
}
