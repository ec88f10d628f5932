"""Liveness and readiness for load balancers."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from tally.api.deps import ServicesDep

router = APIRouter(tags=["operation"])


class Health(BaseModel):
    status: str


@router.get("/healthz", summary="The process is alive")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", summary="The store answers")
def readyz(services: ServicesDep) -> Health:
    services.store.ping()
    return Health(status="ready")
