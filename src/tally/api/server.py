"""How `tally serve` runs the API: uvicorn, with TLS and the limits that protect the server.

TLS: uvicorn builds its own SSLContext from a few file options and cannot pin the protocol
versions, so the context is built here (`tls_context`) and handed to uvicorn as its
`ssl_context_factory`, which every worker process calls when it loads its configuration.

Limits (OWASP API4): uvicorn's httptools protocol buffers request headers without any bound,
gives a client unlimited time to send them, and starts its idle timer only after a first
response. `GuardedHttpToolsProtocol` adds those three bounds. The time to send a body is
bounded, with its size, for every route by the request middleware (api/middleware.py), and
open connections by uvicorn's `limit_concurrency` (503 past it).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from tally.settings import Settings

# Mozilla's "intermediate" configuration (TLS 1.2 suites; every TLS 1.3 suite is acceptable).
MOZILLA_INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)
# Two years, as Mozilla recommends; only ever sent by a server that speaks nothing but HTTPS.
HSTS = ("Strict-Transport-Security", "max-age=63072000")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def of(cls, settings: Settings) -> TlsFiles | None:
        """The files `settings` name; None when TLS is off (Settings checks they pair up)."""
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        return cls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context: TLS 1.2 and 1.3 only, Mozilla intermediate ciphers, and with
    `client_ca` a client certificate signed by it required (mutual TLS).

    Raises ValueError, naming the setting and file, when a file is not what it should be.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(MOZILLA_INTERMEDIATE_CIPHERS)
    # Client-initiated renegotiation (TLS 1.2) only costs the server CPU.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(
            f"TALLY_TLS_CERT ({files.cert}) and TALLY_TLS_KEY ({files.key}) must be a PEM "
            f"certificate chain and its private key: {_reason(error)}"
        ) from None
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(
                f"TALLY_TLS_CLIENT_CA ({files.client_ca}) must hold PEM CA certificates: "
                f"{_reason(error)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(error: OSError) -> str:
    return str(getattr(error, "reason", None) or error.strerror or error)


def _uvicorn_tls(
    files: TlsFiles, config: uvicorn.Config, default: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext:
    del config, default  # the context comes from the files alone, not uvicorn's options
    return tls_context(files)


class HeadersTooLarge(Exception):
    """Raised inside the parser's callbacks to stop it: the request's headers are too large."""


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_seconds: float


_EDGE_PROBLEMS = {
    408: ("request-timeout", "Request timeout"),
    431: ("request-header-fields-too-large", "Request header fields too large"),
}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with three bounds it lacks:

    - request line and headers over `max_header_bytes`: 431, connection closed (counted as
      the parser delivers them, and on the raw bytes while they are still arriving, because
      the parser buffers a header until it is complete: an endless one is cut off too);
    - request line and headers not complete within `header_timeout_seconds` of their first
      byte (slowloris): 408, connection closed;
    - a new connection that sends nothing is closed after the keep-alive timeout, as an idle
      one is after a response.
    """

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._reading_headers = False
        self._header_bytes = 0  # request line and headers as parsed
        self._arrived_bytes = 0  # raw bytes received while the headers were incomplete
        self._headers_too_large = False
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Only data that left the parser still inside the headers counts: a chunk that ends
        # them may carry the body too. So the check lags by at most one read.
        if self._reading_headers and not self.transport.is_closing():
            self._arrived_bytes += len(data)
            if self._arrived_bytes > self._limits.max_header_bytes:
                self._refuse(431, "Request header fields too large.")

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers any parser error with 400; one raised by `_count` is a 431.
        if self._headers_too_large:
            self._refuse(431, "Request header fields too large.")
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._header_bytes = self._arrived_bytes = 0
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(
            self._limits.header_timeout_seconds, self._headers_too_slow
        )

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        """Raises HeadersTooLarge past the limit (the parser stops; see send_400_response)."""
        self._header_bytes += size
        if self._header_bytes > self._limits.max_header_bytes:
            self._headers_too_large = True
            raise HeadersTooLarge

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._stop_header_timer()
        super().on_headers_complete()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._reading_headers and not self.transport.is_closing():
            self._refuse(408, "Request headers not received in time.")

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, status: int, message: str) -> None:
        self._reading_headers = False
        self._stop_header_timer()
        if self.transport.is_closing():  # refused already
            return
        # A problem document like every other refusal, though no request (and so no app)
        # exists yet: its request id is made here, and the log line carries it.
        request_id = uuid.uuid4().hex
        slug, title = _EDGE_PROBLEMS[status]
        body = json.dumps(
            {
                "type": f"/problems/{slug}",
                "title": title,
                "status": status,
                "detail": message,
                "code": "ERR-VAL-400",
                "request_id": request_id,
            }
        ).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/problem+json\r\n",
            b"x-request-id: %s\r\n" % request_id.encode(),
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.logger.warning("%s request_id=%s", message, request_id)
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def check(settings: Settings) -> None:
    """Raises ValueError, saying what to fix, when the server could not start as configured."""
    files = TlsFiles.of(settings)
    if files is not None:
        tls_context(files)


def run(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Serve the API until stopped, HTTPS only when `settings` name a certificate.

    Raises ValueError as `check` does, before any worker starts.
    """
    check(settings)
    files = TlsFiles.of(settings)
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_seconds=settings.request_timeout_seconds,
    )
    # A partial, not a subclass made here: uvicorn pickles its configuration to each worker.
    protocol = cast("type[asyncio.Protocol]", partial(GuardedHttpToolsProtocol, limits=limits))
    uvicorn.run(
        "tally.api.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=protocol,
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=settings.keepalive_timeout_seconds,
        limit_concurrency=settings.max_connections,
        ssl_context_factory=partial(_uvicorn_tls, files) if files is not None else None,
        # uvicorn adds these to every response, its own refusals included.
        headers=[HSTS] if files is not None else None,
    )
