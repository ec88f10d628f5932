"""`create_app`: the ASGI application, built from settings with nothing done at import."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from starlette.concurrency import run_in_threadpool

from tally import __doc__ as summary
from tally.api import (
    admin,
    cancellations,
    docs,
    events,
    health,
    metrics,
    openapi,
    problems,
    reconciliation,
    usage,
)
from tally.api.encoding import ContentDecoding
from tally.api.fastpath import TallyAPI
from tally.api.middleware import RequestContext
from tally.bootstrap import Services, build
from tally.logs import configure_logging
from tally.metrics import serve_registry
from tally.ratelimit.http import RateLimitHeaders
from tally.settings import Settings

# The young generation's threshold of a server process (CPython's default: 700 allocations).
GC_YOUNG_OBJECTS = 50_000


def settle_heap() -> None:
    """Leave what a started server holds for good out of the cyclic garbage collector, and
    collect less often: in a worker, the modules, the app, its OpenAPI schema and the caches
    are over 100,000 objects that every full collection walked again, and a request allocates
    enough to start a young collection every few events. Objects frozen are still freed by
    reference counting; only a cycle among them would stay.

    In-process, batches of 1,000 bench events on SQLite (the same minutes): the collector's
    time went from 12.9-14.6 us to 0.9-1.3 us an event, 10-15% of the batch path."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_OBJECTS, 10, 10)


def create_app(
    settings: Settings | None = None,
    *,
    services: Services | None = None,
    server: bool = False,
) -> TallyAPI:
    """The API. Given `services`, it uses them (and leaves closing them to the caller);
    otherwise it builds them from `settings` at start-up and closes them at shutdown,
    committing in-flight batches first. `server`: a process of `tally serve`, whose heap is
    settled once started (`settle_heap`)."""
    settings = settings or (services.settings if services else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            app.state.services = services
            yield
            return
        built = await run_in_threadpool(build, settings)
        app.state.services = built
        exporter = serve_registry(settings, built.metrics)  # TALLY_METRICS_PORT, one process
        if server:
            settle_heap()
        try:
            yield
        finally:
            if exporter is not None:
                exporter.close()
            await run_in_threadpool(built.close)

    app = TallyAPI(
        title="Tally",
        version="1.0.0",
        summary=summary,
        description=(
            "Records billable events exactly once and exports them to billing systems. Every "
            "refusal is an RFC 9457 problem document (`application/problem+json`, the `Problem` "
            "schema) with the requirement's `code`; a method a path does not list gets 405 "
            "with `Allow`."
        ),
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
        # Served by api/docs.py with assets from this package, not a CDN.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        # No redirect from /v1/events/ to /v1/events: Starlette builds its Location from the
        # request's Host (and a proxy's X-Forwarded-Proto), which a client chooses. Such a
        # path is a 404 problem document like any unknown one.
        redirect_slashes=False,
    )
    if services is not None:
        app.state.services = services
    routers: tuple[APIRouter, ...] = (
        events.router,
        cancellations.router,
        admin.router,
        reconciliation.router,
        usage.router,
        health.router,
        docs.router,
    )
    if settings.metrics_port is None:  # else served on that port alone (metrics.supervise)
        routers = (*routers, metrics.router)
    routes = [route for router in routers for route in router.routes]
    problems.install(app, routes)
    # The routes by themselves (included routers are opaque): the server's edge names the
    # route of a request it refuses before the application sees it (api/server.py).
    app.state.routes = routes
    for router in routers:
        app.include_router(router)
    app.add_middleware(RateLimitHeaders)  # inside RequestContext: 2xx get RateLimit-* too
    app.add_middleware(ContentDecoding, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(
        RequestContext,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_seconds=settings.request_timeout_seconds,
    )
    app.serve_events_fast(routes)  # POST /v1/events: this middleware, then api/fastpath.py

    openapi.install(app)
    return app


def app_from_environment() -> FastAPI:
    """The factory `tally serve` hands to uvicorn, in each worker process."""
    settings = Settings()
    configure_logging(settings)
    return create_app(settings, server=True)
