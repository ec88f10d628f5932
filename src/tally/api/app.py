"""`create_app`: the ASGI application, built from settings with nothing done at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tally import __doc__ as summary
from tally.api import admin, events, health, problems
from tally.api.middleware import RequestContext
from tally.api.schemas import BatchIn
from tally.bootstrap import Services, build
from tally.events.validation import CloudEventIn, EventIn
from tally.logs import configure_logging
from tally.ratelimit.http import RateLimitHeaders
from tally.settings import Settings


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    """The API. Given `services`, it uses them (and leaves closing them to the caller);
    otherwise it builds them from `settings` at start-up and closes them at shutdown,
    committing in-flight batches first."""
    settings = settings or (services.settings if services else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            app.state.services = services
            yield
            return
        built = await run_in_threadpool(build, settings)
        app.state.services = built
        try:
            yield
        finally:
            await run_in_threadpool(built.close)

    app = FastAPI(
        title="Tally",
        version="1.0.0",
        summary=summary,
        description="Records billable events exactly once and exports them to billing systems.",
        lifespan=lifespan,
    )
    if services is not None:
        app.state.services = services
    routers = (events.router, admin.router, health.router)
    problems.install(app, [route for router in routers for route in router.routes])
    for router in routers:
        app.include_router(router)
    app.add_middleware(RateLimitHeaders)  # inside RequestContext: 2xx get RateLimit-* too
    app.add_middleware(
        RequestContext,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_seconds=settings.request_timeout_seconds,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        # Bodies that routes read themselves (after authenticating), described by name.
        bodies: tuple[type[BaseModel], ...] = (EventIn, BatchIn, CloudEventIn, *admin.BODY_MODELS)
        for model in bodies:
            found = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(found.pop("$defs", {}))
            schemas[model.__name__] = found
        # Tally answers invalid requests with 400 problem documents, never FastAPI's 422.
        for path in document["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def app_from_environment() -> FastAPI:
    """The factory `tally serve` hands to uvicorn, in each worker process."""
    settings = Settings()
    configure_logging(settings)
    return create_app(settings)
