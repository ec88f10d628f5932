"""POST /v1/events/{application}/{id}/cancel: withdraw an event while its periods are open."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tally.api.admin import body, body_doc
from tally.api.deps import PrincipalDep, ServicesDep, known_query_only, principal
from tally.api.events import JSON
from tally.api.problems import responses
from tally.api.schemas import CancelIn, Cancellation
from tally.events.validation import EventId, Name

router = APIRouter(tags=["events"], dependencies=[Depends(known_query_only)])


@router.post(
    "/v1/events/{application}/{event_id:path}/cancel",
    summary="Cancel an event (its periods not yet final)",
    response_model=Cancellation,
    responses=responses(
        (404, "No such event among those the key may cancel (another application's: the same)"),
        (
            409,
            "Cancelled already for another reason, the event's periods are final "
            "(/problems/period-final), or its tenant was shredded",
        ),
        (415, "The body is not application/json"),
    ),
    openapi_extra=body_doc(CancelIn),
)
async def cancel_event(
    application: Name,
    event_id: EventId,
    caller: PrincipalDep,
    spec: Annotated[CancelIn, Depends(body(CancelIn, principal))],
    services: ServicesDep,
) -> Response:
    """By a key with `events:write` for its own application's events, or an `admin` key.
    Appends the cancellation to the export log (the event itself never changes); the same
    reason again answers the same cancellation."""
    cancellation = await run_in_threadpool(
        services.cancel.cancel, caller, application, event_id, spec.reason
    )
    return Response(cancellation.to_json(), media_type=JSON)
