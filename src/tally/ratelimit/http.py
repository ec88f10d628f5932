"""Rate limits on the wire: the RateLimit fields, and the request's note of its charges.

The fields follow draft-ietf-httpapi-ratelimit-headers-06 (the last draft with separate
`RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` fields): the limit is the burst
of the tightest bucket the request was checked against, the remaining units in it, and the
seconds until it is full again. A 429 adds `Retry-After` (api/problems.py).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally.ratelimit.policy import RateNote

_STATE_KEY = "rate_limit_note"


def rate_limit_fields(*, limit: int, remaining: int, reset: int) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(remaining),
        "RateLimit-Reset": str(reset),
    }


def note_of(request: Request) -> RateNote:
    """The note of what `request` was charged, created on first use."""
    state = request.scope.setdefault("state", {})
    note = state.get(_STATE_KEY)
    if not isinstance(note, RateNote):
        note = state[_STATE_KEY] = RateNote()
    return note


class RateLimitHeaders:
    """ASGI middleware: adds the RateLimit fields of the request's tightest checked limit to a
    response that does not carry them already (a 429 carries its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The routes reach this dict through request.state; it is created here so that it is
        # the same object whoever creates the Request.
        state = scope.setdefault("state", {})

        async def send_with_fields(message: Message) -> None:
            note = state.get(_STATE_KEY)
            if (
                message["type"] == "http.response.start"
                and isinstance(note, RateNote)
                and note.tightest is not None
            ):
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"ratelimit-limit" for name, _ in headers):
                    decision = note.tightest
                    fields = rate_limit_fields(
                        limit=decision.limit, remaining=decision.remaining, reset=decision.reset
                    )
                    headers += [(k.lower().encode(), v.encode()) for k, v in fields.items()]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_fields)
