"""POST /v1/events without FastAPI's routing and dependency injection: the hot path.

Every reporting application calls this one route, many times a second per process. Through
FastAPI, each call resolved its dependencies, ran the key lookup and the rate limit in a
worker thread, ran its parsing in another, and blocked that thread until the group commit
(store/groupcommit.py) answered. `FastIngest` answers the route on the event loop instead:
the key comes from the process's fresh copies (freshness.py), the limiter's memory answers
in-process, the body is parsed and sealed on the loop, and the commit is awaited. What needs
I/O (a key or tenant not in memory, Redis, a large body) still goes to a worker thread.

`TallyAPI` wraps it in the app's own middleware, so the request id, the access log, the
metrics, the bounds on the body, gzip and the RateLimit fields (api/middleware.py,
api/encoding.py, ratelimit/http.py) apply to it exactly as to every other route. What it
answers is `events.answer_post_events`, the function the FastAPI route calls too, so both
give the same answers, errors included, and the OpenAPI document (built from the FastAPI
route, which stays registered) describes it exactly. Its refusals are the same problem
documents (api/problems.py); any other exception is left to RequestContext, as for every
route.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from tally.api.deps import principal_on_loop, refuse_unknown_query
from tally.api.events import answer_post_events
from tally.api.problems import from_error, from_http_error
from tally.bootstrap import Services
from tally.errors import TallyError

PATH = "/v1/events"
METHOD = "POST"


class FastIngest:
    """The ASGI endpoint of POST /v1/events (`TallyAPI` wraps it in the app's middleware)."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        # The FastAPI route it stands in for: its template labels the request in the
        # metrics and access log (scope["route"]), as routing would have set it.
        self.route = next(
            route
            for route in routes
            if isinstance(route, APIRoute)
            and route.path == PATH
            and METHOD in (route.methods or ())
        )

    @staticmethod
    def serves(scope: Scope) -> bool:
        return bool(scope["type"] == "http" and scope["path"] == PATH and scope["method"] == METHOD)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route
        request = Request(scope, receive)
        response: Response
        try:
            # The order of the route's dependencies: the query first, then the key.
            refuse_unknown_query(request, None)
            services: Services = request.app.state.services
            caller = await principal_on_loop(request, services)
            response = await answer_post_events(request, caller, services)
        except TallyError as error:
            response = from_error(request, error)
        except HTTPException as error:  # the body's bounds and coding (408, 413, 415)
            response = from_http_error(request, error, ())
        await response(scope, receive, send)


class TallyAPI(FastAPI):
    """FastAPI, but for POST /v1/events, which goes straight to `FastIngest` wrapped in the
    app's own middleware (`add_middleware`), past FastAPI's and Starlette's outer layers
    (their error, telemetry and body-limit middleware, and routing): RequestContext already
    answers every fault with a problem document."""

    fast: ASGIApp | None = None

    def serve_events_fast(self, routes: Sequence[BaseRoute]) -> None:
        """Build the fast stack, once every middleware is added."""
        stack: ASGIApp = FastIngest(routes)
        for cls, args, kwargs in reversed(self.user_middleware):
            stack = cls(stack, *args, **kwargs)
        self.fast = stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast is not None and FastIngest.serves(scope):
            scope["app"] = self
            await self.fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
