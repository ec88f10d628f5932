"""GET /v1/reconciliation: per tenant, type and period, the figures and digest a billing system
checks its copy against, and whether the period is final (docs/reconciliation.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from tally.api.deps import PrincipalDep, ServicesDep, known_query_only
from tally.api.problems import responses
from tally.api.render import CSV, JSON, csv_lines, json_text, negotiate
from tally.events.model import format_decimal, format_time
from tally.events.validation import Name, Rfc3339
from tally.events.windows import zone
from tally.services.reconciliation import ReconciliationRow

router = APIRouter(tags=["reconciliation"], dependencies=[Depends(known_query_only)])

CSV_COLUMNS = (
    "tenant",
    "type",
    "period_start",
    "period_end",
    "count",
    "sum",
    "digest",
    "last_received_at",
    "cancelled_count",
    "cancelled_sum",
    "final",
    "final_at",
)


class CancelledFigures(BaseModel):
    count: int
    sum: str = Field(description="Exact decimal as a string")


class ReconciliationRowOut(BaseModel):
    tenant: str
    type: str
    period_start: str = Field(description="RFC 3339 with the offset of `tz`")
    period_end: str = Field(description="RFC 3339 with the offset of `tz`; exclusive")
    count: int = Field(description="Events of the period, cancelled ones left out")
    sum: str = Field(description="Their exact sum of quantities, as a decimal string")
    digest: str = Field(description="docs/reconciliation.md; covers cancelled events too")
    last_received_at: str = Field(description="RFC 3339, UTC: the latest event received")
    cancelled: CancelledFigures
    final: bool = Field(description="The figures of a final period never change")
    final_at: str = Field(description="RFC 3339, UTC: period_end + the tenant's lateness window")


class ReconciliationOut(BaseModel):
    rows: list[ReconciliationRowOut]


def _document(row: ReconciliationRow, tz: ZoneInfo) -> dict[str, Any]:
    return {
        "tenant": row.tenant,
        "type": row.type,
        "period_start": row.period_start.astimezone(tz).isoformat(),
        "period_end": row.period_end.astimezone(tz).isoformat(),
        "count": row.count,
        "sum": format_decimal(row.sum),
        "digest": row.digest,
        "last_received_at": format_time(row.last_received_at),
        "cancelled": {"count": row.cancelled_count, "sum": format_decimal(row.cancelled_sum)},
        "final": row.final,
        "final_at": format_time(row.final_at),
    }


def _flat(document: dict[str, Any]) -> dict[str, Any]:
    cancelled = document["cancelled"]
    return {**document, "cancelled_count": cancelled["count"], "cancelled_sum": cancelled["sum"]}


@router.get(
    "/v1/reconciliation",
    summary="Figures and digests per tenant, type and period, and which periods are final",
    response_model=ReconciliationOut,
    responses={
        200: {"content": {CSV: {"schema": {"type": "string"}}}},
        **responses((406, "Accept names neither application/json nor text/csv")),
    },
)
def get_reconciliation(
    *,
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    from_: Annotated[Rfc3339, Query(alias="from", description="Event time >= this")],
    to: Annotated[Rfc3339, Query(description="Event time < this")],
    # The same names as events/windows.py's PERIODS, so the schema refuses what it does.
    period: Annotated[Literal["hour", "day", "month"], Query()],
    tz: Annotated[
        str, Query(min_length=1, max_length=64, description="IANA time zone of the periods")
    ] = "UTC",
    tenant: Annotated[Name | None, Query(description="Omit: every tenant the key reads")] = None,
) -> Response:
    """One row per tenant, type and period of `[from, to)` that holds an event (periods of
    `tz`, cut to the range), ordered by tenant, type and period. `Accept: text/csv` gives the
    rows as CSV, `cancelled` as `cancelled_count` and `cancelled_sum`."""
    media = negotiate(request.headers.get("accept"), (JSON, CSV))
    rows = services.reconciliation.rows(
        principal, tenant=tenant, start=from_, end=to, period=period, tz=tz
    )
    documents = [_document(row, zone(tz)) for row in rows]
    if media == CSV:
        return StreamingResponse(
            csv_lines(CSV_COLUMNS, (_flat(d) for d in documents)), media_type=CSV
        )
    return Response(json_text({"rows": documents}), media_type=JSON)
