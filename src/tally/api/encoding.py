"""Request bodies sent with a `Content-Encoding`: gzip is decoded, anything else is refused.

SDKs compress large batches, so `gzip` (and `identity`) are read; any other coding gets 415
rather than being parsed as if it were JSON. The size bound (`TALLY_MAX_BODY_BYTES`) applies to
the decoded body: it is inflated incrementally, never past the bound plus one byte, so a small
zip bomb cannot make the server hold more than a plain body could.

Plain ASGI middleware that wraps `receive`, installed inside `RequestContext` (whose bound on
the bytes on the wire still applies). Its errors are HTTPExceptions raised from `receive`, that
is from inside the route's (or FastAPI's) read of the body, so that the one problem mapping
answers them, and only a route that reads its body judges it: a 401 still comes first.
"""

from __future__ import annotations

import zlib
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_GZIP = 31  # zlib's wbits for a gzip header and trailer (16 + the 32 KiB window)
_IDENTITY = "identity"
_GZIP_NAMES = ("gzip", "x-gzip")  # RFC 9110 8.4.1.3: x-gzip is gzip


def _codings(scope: Scope) -> list[str]:
    """The content codings the request declares, in the order they were applied."""
    found: list[str] = []
    for name, value in scope["headers"]:
        if name == b"content-encoding":
            found += [c.strip().lower() for c in value.decode("latin-1").split(",")]
    return [coding for coding in found if coding and coding != _IDENTITY]


def _without_body_headers(scope: Scope) -> Scope:
    # The app sees the decoded body: its length is no longer the declared one.
    headers = [
        (name, value)
        for name, value in scope["headers"]
        if name not in (b"content-encoding", b"content-length")
    ]
    return {**scope, "headers": headers}


def _refusing(receive: Receive) -> Receive:
    """`receive`, raising 415 as soon as a body byte arrives. An empty body holds nothing to
    decode, so a GET that merely declares a coding is answered as usual."""

    async def refusing() -> Message:
        message = await receive()
        if message["type"] == "http.request" and (
            message.get("body") or message.get("more_body", False)
        ):
            # The coding is not named: a header's value is the client's, not a message.
            raise HTTPException(
                415, "This Content-Encoding is not supported: send the body as is or in gzip."
            )
        return message

    return refusing


def _gunzip(receive: Receive, *, limit: int) -> Receive:
    """`receive`, with each body chunk inflated from gzip; 413 once the inflated body passes
    `limit` bytes, 400 when the gzip data is corrupt or ends early. A body of several gzip
    members (RFC 1952 allows it) is read as their concatenation."""
    inflater = zlib.decompressobj(wbits=_GZIP)
    produced = 0
    seen_input = False
    complete = False

    def inflate(data: bytes) -> bytes:
        nonlocal inflater, produced
        out: list[bytes] = []
        while data:
            # At most one byte past the limit is ever inflated: enough to know it is over.
            chunk = inflater.decompress(data, limit + 1 - produced)
            produced += len(chunk)
            if produced > limit:
                raise HTTPException(
                    413, f"The decompressed body is over the limit of {limit} bytes."
                )
            out.append(chunk)
            data = inflater.unconsumed_tail
            if inflater.eof:
                data = inflater.unused_data
                if data:
                    inflater = zlib.decompressobj(wbits=_GZIP)
        return b"".join(out)

    async def gunzip() -> Message:
        nonlocal seen_input, complete
        message = await receive()
        if complete or message["type"] != "http.request":
            return message
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        seen_input = seen_input or bool(body)
        try:
            decoded = inflate(body)
        except zlib.error:
            raise HTTPException(400, "The body is not valid gzip data.") from None
        if not more:
            complete = True
            if seen_input and not inflater.eof:
                raise HTTPException(400, "The gzip body ends before its gzip data does.")
        decoded_message: dict[str, Any] = {**message, "body": decoded}
        return decoded_message

    return gunzip


class ContentDecoding:
    """Decodes gzip request bodies within `max_body_bytes`; refuses other codings (415)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        codings = _codings(scope) if scope["type"] == "http" else []
        if not codings:
            await self.app(scope, receive, send)
        elif len(codings) == 1 and codings[0] in _GZIP_NAMES:
            decoded = _gunzip(receive, limit=self.max_body_bytes)
            await self.app(_without_body_headers(scope), decoded, send)
        else:
            await self.app(scope, _refusing(receive), send)
