"""GET /metrics: the Prometheus text exposition, for admin keys (docs/operations.md).

Metrics describe every tenant's traffic (their volumes, the export lag of each key), so they
are not for tenants: on the API port they need an admin key. In production, set
TALLY_METRICS_PORT instead: they are then served on that port, to be reached only from the
monitoring network, and this route does not exist.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tally.api.deps import AdminDep
from tally.metrics import CONTENT_TYPE, of_state

router = APIRouter(tags=["operation"])


@router.get(
    "/metrics",
    name="get_metrics",
    summary="Metrics in the Prometheus text format (admin)",
    response_class=Response,
    responses={
        200: {
            "description": "The Prometheus text exposition format, version 0.0.4.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(request: Request, _: AdminDep) -> Response:
    # Summing several workers' files is disk reads: off the event loop.
    body = await run_in_threadpool(of_state(request.app.state).exposition)
    return Response(body, media_type=CONTENT_TYPE)
