"""Liveness and readiness for load balancers.

`/readyz` checks what a request needs, each the way a request would use it: the store
answers, the keyring opens the store's data keys, and (with TALLY_REDIS_URL) Redis answers.
A store or keyring that fails is a 503 problem document naming it; Redis down is not, since
rate limits then fall back to each process (ratelimit/failover.py): the server is still
ready, and says it is degraded. A draining server answers 503 before any of this runs
(api/drain.py).
"""

from __future__ import annotations

from typing import Literal

import structlog
from fastapi import APIRouter
from pydantic import BaseModel, Field

from tally.api.deps import ServicesDep
from tally.api.problems import responses
from tally.crypto.keyring import KeyringError
from tally.errors import StoreUnavailable
from tally.ratelimit.failover import FailoverLimiter

log = structlog.get_logger(__name__)

router = APIRouter(tags=["operation"])


class Health(BaseModel):
    status: str


class Checks(BaseModel):
    """What each dependency answered. A failing store or keyring is a 503, never listed."""

    store: Literal["ok"] = Field(description="The store answers a query")
    keyring: Literal["ok"] = Field(description="The keyring opens the store's data keys")
    redis: Literal["ok", "unreachable", "not_configured"] = Field(
        description="The shared rate-limit store; while unreachable, limits are per process"
    )


class Readiness(BaseModel):
    status: Literal["ready", "degraded"] = Field(
        description="degraded: ready, with a dependency down that requests can do without"
    )
    checks: Checks


@router.get("/healthz", summary="The process is alive")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Every dependency a request needs answers",
    responses=responses(
        (503, "The store or the keyring fails, or the server is draining; Retry-After is set")
    ),
)
def readyz(services: ServicesDep) -> Readiness:
    services.store.ping()
    try:
        services.keys.verify()
    except KeyringError as error:
        # The reason names the keyring's file or command: for the log, not for the caller.
        log.error("readiness_keyring_failed", reason=str(error))
        raise StoreUnavailable(
            "The keyring does not open this store's data keys; see the server's log."
        ) from None
    limiter = services.rate_limits.limiter
    redis: Literal["ok", "unreachable", "not_configured"] = "not_configured"
    if isinstance(limiter, FailoverLimiter):
        redis = "ok" if limiter.shared_answers() else "unreachable"
    return Readiness(
        status="ready" if redis != "unreachable" else "degraded",
        checks=Checks(store="ok", keyring="ok", redis=redis),
    )
