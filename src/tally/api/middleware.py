"""Request ids, access logs and the last line of defence against unhandled faults.

Written as plain ASGI middleware so that an unexpected exception is answered here with a
problem document and is not re-raised to the server (which would log its traceback).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
import uuid
from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally.api.problems import internal_error
from tally.metrics import UNMATCHED_ROUTE, of_state

log = structlog.get_logger("tally.access")

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _bounded(receive: Receive, *, declared: bytes, limit: int, seconds: float) -> Receive:
    """`receive`, refusing a body over `limit` bytes (413: a declared length before a byte is
    read, else as soon as the count passes it) or not complete `seconds` after the app first
    asked for it (408). Once the body is complete `receive` is left alone: later calls wait
    for a disconnect, which may take as long as it takes."""
    over = declared.isdigit() and int(declared) > limit
    received = 0
    complete = False
    deadline: float | None = None

    async def bounded() -> Message:
        nonlocal received, complete, deadline
        if complete:
            return await receive()
        if over:
            raise HTTPException(413, f"The body is over the limit of {limit} bytes.")
        deadline = deadline or asyncio.get_running_loop().time() + seconds
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise HTTPException(
                408,
                f"The body did not arrive within {seconds:g} seconds.",
                headers={"Connection": "close"},
            ) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > limit:
                raise HTTPException(413, f"The body is over the limit of {limit} bytes.")
        return message

    return bounded


_ID_PREFIX: tuple[int, str] = (0, "")
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    """A request id no other request of any process gets: a random prefix drawn once per
    process (again after a fork) and a counter. Unique rather than secret: it names the
    request in logs and answers, and a uuid4 per request cost a system call for randomness."""
    global _ID_PREFIX  # noqa: PLW0603 - one prefix per process, replaced only after a fork
    pid, prefix = _ID_PREFIX
    if pid != os.getpid():
        pid, prefix = _ID_PREFIX = (os.getpid(), uuid.uuid4().hex[:20])
    return f"{prefix}{next(_ID_COUNTER):012x}"


class RequestContext:
    """Request ids, the access log, the last line of defence, and a bound on every body.

    FastAPI reads a route's body before its dependencies run, so without the bound an
    unauthenticated client could make the server hold any amount in memory on an admin
    route. This is the one place bodies are bounded (`_bounded`): the errors are
    HTTPExceptions, which FastAPI passes through its body parsing, and the events route's
    own reader, to the one problem mapping.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout_seconds: float,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        offered = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if _SAFE_REQUEST_ID.fullmatch(offered) else _new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False
        metrics = of_state(getattr(scope.get("app"), "state", None))
        metrics.in_flight(+1)

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers: list[Any] = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            bounded = _bounded(
                receive,
                declared=headers.get(b"content-length", b""),
                limit=self.max_body_bytes,
                seconds=self.body_timeout_seconds,
            )
            await self.app(scope, bounded, send_with_id)
        except Exception as error:  # noqa: BLE001 - answered as ERR-SYS-500, never re-raised
            if response_started:
                log.error(
                    "response_aborted", error_type=type(error).__name__, request_id=request_id
                )
                return
            response = internal_error(Request(scope), error)
            await response(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            # The route's template (set once routed), never the path: ids are not labels.
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            metrics.request(route=route, method=scope["method"], status=status, seconds=seconds)
            metrics.in_flight(-1)
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round(seconds * 1000, 2),
                request_id=request_id,
            )
