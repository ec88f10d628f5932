"""How `tally serve` runs the API: uvicorn, with TLS and the limits that protect the server.

TLS: uvicorn builds its own SSLContext from a few file options and cannot pin the protocol
versions, so the context is built here (`tls_context`) and handed to uvicorn as its
`ssl_context_factory`, which every worker process calls when it loads its configuration.

Limits (OWASP API4): uvicorn's httptools protocol buffers request headers without any bound,
gives a client unlimited time to send them and to read its answers, starts its idle timer
only after a first response and restarts it on any byte, keeps a connection open after
answering a request whose body it did not read, and leaves TLS handshakes asyncio's 60 s.
`GuardedHttpToolsProtocol` and `EdgeLoop` bound all of these, so every connection ends within
the request and keep-alive timeouts. The time to send a body is bounded, with its size, for
every route by the request middleware (api/middleware.py), and open connections by uvicorn's
`limit_concurrency` (503 past it, a problem document like the protocol's own refusals).

Drain: `run` serves with api/drain.py's server (and supervisor for `--workers`), whose state
tells the protocol when SIGTERM has come; every request starting after it is refused here.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import httptools
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Match
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from tally import metrics
from tally.api.drain import DrainingServer, DrainState, DrainTimes, Workers
from tally.api.problems import RETRY_AFTER_SECONDS
from tally.logs import configure_logging
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


class _StopParsing(Exception):
    """Raised inside the parser's callbacks while lingering: a next request begins."""


# A lingering close drains what a refused client still sends: up to LINGER_BODIES bodies of
# the largest size allowed, at least LINGER_MIN_BYTES, for the keep-alive timeout.
LINGER_BODIES = 4
LINGER_MIN_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_seconds: float
    # A lingering close reads and discards at most this many bytes, for at most this long.
    linger_bytes: int
    linger_seconds: float
    # The longest the client may leave the server's send buffer full (it reads nothing).
    write_stall_seconds: float


@dataclass(frozen=True)
class EdgeProblem:
    """A refusal the server's edge makes itself, before or beside the application."""

    status: int
    code: str
    slug: str
    title: str
    retry_after: str | None = None


HEADERS_TOO_LARGE = EdgeProblem(
    431, "ERR-VAL-400", "request-header-fields-too-large", "Request header fields too large"
)
HEADERS_TOO_SLOW = EdgeProblem(408, "ERR-VAL-400", "request-timeout", "Request timeout")
MALFORMED = EdgeProblem(400, "ERR-VAL-400", "malformed-request", "Malformed HTTP request")
OVER_CAPACITY = EdgeProblem(
    503, "ERR-SYS-503", "service-unavailable", "Service unavailable", RETRY_AFTER_SECONDS
)
# The same problem as a full server (retry shortly, elsewhere); its detail says why.
SHUTTING_DOWN = OVER_CAPACITY


def edge_response(
    problem: EdgeProblem, detail: str, default_headers: list[tuple[bytes, bytes]]
) -> tuple[bytes, str]:
    """The whole HTTP/1.1 response for `problem` (a problem document, `Connection: close`) and
    the request id it carries: no application (and so no request id) exists where it is sent."""
    request_id = uuid.uuid4().hex
    body = json.dumps(
        {
            "type": f"/problems/{problem.slug}",
            "title": problem.title,
            "status": problem.status,
            "detail": detail,
            "code": problem.code,
            "request_id": request_id,
        }
    ).encode()
    head = [STATUS_LINE[problem.status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    if problem.retry_after is not None:
        head.append(b"retry-after: %s\r\n" % problem.retry_after.encode())
    head += [
        b"content-type: application/problem+json\r\n",
        b"x-request-id: %s\r\n" % request_id.encode(),
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body, request_id


def _count_refusal(app: object, status: int, scope: Mapping[str, Any] | None) -> None:
    """An edge refusal in the metrics like any answer (answered at once), so that the SLO
    counts what clients got: under the route it was for when the request was parsed (a 503
    past the connection cap or while draining), else as unmatched (431, 408, 400)."""
    for _ in range(_WRAPPERS):  # uvicorn's own middlewares wrap the application
        if isinstance(app, Starlette):
            break
        app = getattr(app, "app", None)
    else:
        return
    route, method = metrics.UNMATCHED_ROUTE, "OTHER"
    if scope is not None:
        method = str(scope.get("method", method))
        routes: list[BaseRoute] = getattr(app.state, "routes", [])  # set by api/app.py
        matched = (r for r in routes if r.matches(dict(scope))[0] is Match.FULL)
        route = getattr(next(matched, None), "path", route)
    metrics.of_state(app.state).request(route=route, method=method, status=status, seconds=0.0)


_WRAPPERS = 8


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds it lacks:

    - request line and headers over `max_header_bytes`: 431, connection closed (counted as
      the parser delivers them, and on the raw bytes while they are still arriving, because
      the parser buffers a header until it is complete: an endless one is cut off too);
    - request line and headers not complete within `header_timeout_seconds` of their first
      byte (slowloris): 408, connection closed;
    - a new connection that sends nothing is closed after the keep-alive timeout, as an idle
      one is after a response, and bytes that start no request (blank lines) do not restart
      that clock;
    - a client that reads nothing of its response while the send buffer is full, for
      `write_stall_seconds`: the connection is aborted (reading slowly is not stalling);
    - an early refusal, a response sent while the request's body is still arriving (a 401 or
      413 before the body is read), ends the connection: `Connection: close`, then a lingering
      close (below), so a client dribbling a body cannot hold the connection for ever.

    Its own refusals (431, 408, uvicorn's 400 for malformed HTTP and 503 past the connection
    cap) are problem documents built by `edge_response`, each followed by a lingering close.

    Lingering close: the answer is written, then what the client still sends is read and
    discarded, at most `linger_bytes` for at most `linger_seconds`, before the connection
    closes. Closing with unread bytes makes the kernel send a reset, which can reach a client
    that is still sending its body before it reads the answer; draining first lets it read.
    """

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._reading_headers = False
        self._message_began = False
        self._header_bytes = 0  # request line and headers as parsed
        self._arrived_bytes = 0  # raw bytes received while the headers were incomplete
        self._headers_too_large = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None  # running while writes wait
        self._served: RequestResponseCycle | None = None  # the request its app answers
        # While lingering: the future resolved when it ends, whether the request's body is
        # still parsed (to end as soon as it is complete), the bytes discarded and the timer.
        self._lingering: asyncio.Future[None] | None = None
        self._linger_parses = False
        self._lingered_bytes = 0
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self._stop_write_timer()
        self._disconnect_served()
        self._end_linger()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._discard(data, self._lingering)
            return
        # uvicorn stops the keep-alive clock on any byte; only a request beginning should.
        idle = self.timeout_keep_alive_task
        self.timeout_keep_alive_task = None
        self._message_began = False
        super().data_received(data)
        if idle is not None:
            if (
                self._message_began
                or self.timeout_keep_alive_task is not None
                or self._lingering is not None
            ):
                idle.cancel()
            else:
                self.timeout_keep_alive_task = idle
        # Only data that left the parser still inside the headers counts: a chunk that ends
        # them may carry the body too. So the check lags by at most one read.
        if self._reading_headers and not self.transport.is_closing():
            self._arrived_bytes += len(data)
            if self._arrived_bytes > self._limits.max_header_bytes:
                self._refuse(HEADERS_TOO_LARGE, "Request header fields too large.")

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers any parser error with 400; one raised by `_count` is a 431.
        if self._headers_too_large:
            self._refuse(HEADERS_TOO_LARGE, "Request header fields too large.")
        else:
            self._refuse(MALFORMED, "The request is not valid HTTP/1.1.")

    def on_message_begin(self) -> None:
        if self._lingering is not None:
            raise _StopParsing  # a pipelined request after a refused one is not served
        super().on_message_begin()
        self._message_began = self._reading_headers = True
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

    def on_body(self, body: bytes) -> None:
        if self._lingering is None:  # else the answer is out: the body is read to be dropped
            super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._end_linger()  # the client has sent all it meant to: nothing is left unread

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # The one place every request's application starts, uvicorn's 503 past the
        # connection cap included.
        if app is service_unavailable:
            self._refuse(OVER_CAPACITY, "Too many open connections; retry shortly.", cycle.scope)
            return
        if isinstance(self.server_state, DrainState) and self.server_state.draining:
            # api/drain.py: from SIGTERM on, only the requests already running are served.
            self._refuse(SHUTTING_DOWN, "This server is shutting down; retry shortly.", cycle.scope)
            return
        self._served = cycle
        super()._start_asgi_task(cycle, self._closing_after_early_refusal(cycle, app))

    def _disconnect_served(self) -> None:
        """Tell the response being written that the client is gone. uvicorn tells only the
        last request parsed, which with pipelining is a later one: the writer, woken when the
        send buffer is freed, would write to a closed transport."""
        if self._served is not None and not self._served.response_complete:
            self._served.disconnected = True
            self._served.message_event.set()

    def _closing_after_early_refusal(
        self, cycle: RequestResponseCycle, app: ASGI3Application
    ) -> ASGI3Application:
        """`app`, its response ending the connection when it starts before the request's
        body has all arrived: `Connection: close`, and the response's end held back (its
        bytes are all sent) until the lingering close is over; uvicorn then closes."""

        async def guarded(scope: Any, receive: Any, send: Any) -> None:
            async def send_closing(message: Any) -> None:
                if message["type"] == "http.response.start" and cycle.more_body:
                    headers = [
                        (name, value)
                        for name, value in message.get("headers", [])
                        if name.lower() != b"connection"
                    ]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
                elif (
                    message["type"] == "http.response.body"
                    and not message.get("more_body", False)
                    and cycle.more_body
                ):
                    await send({**message, "more_body": True})
                    await self._linger(parses=True)
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
                await send(message)

            await app(scope, receive, send_closing)

        return guarded

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(
                self._limits.write_stall_seconds, self._not_reading
            )

    def resume_writing(self) -> None:
        self._stop_write_timer()
        super().resume_writing()

    def _not_reading(self) -> None:
        # Nothing can be said to a client that reads nothing: the connection is dropped.
        self._write_timer = None
        self.logger.warning("Client stopped reading its response; connection aborted.")
        self._disconnect_served()  # before connection_lost does: see there
        self.transport.abort()

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._reading_headers and not self.transport.is_closing():
            self._refuse(HEADERS_TOO_SLOW, "Request headers not received in time.")

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse(
        self, problem: EdgeProblem, detail: str, scope: Mapping[str, Any] | None = None
    ) -> None:
        """Answer with `problem` and close (lingering), whatever the request was; `scope` is
        the request's when it was parsed whole."""
        self._reading_headers = False
        self._stop_header_timer()
        if self.transport.is_closing() or self._lingering is not None:  # refused already
            return
        response, request_id = edge_response(problem, detail, self.server_state.default_headers)
        self.logger.warning("%s request_id=%s", detail, request_id)
        _count_refusal(self.app, problem.status, scope)
        self.transport.write(response)
        self._linger(parses=False).add_done_callback(lambda _: self.transport.close())

    def _linger(self, *, parses: bool) -> asyncio.Future[None]:
        """Start the lingering close (see the class); the future resolves when it is over.
        With `parses`, the parser still reads the request (its body is dropped), so that
        the linger ends as soon as the body is complete."""
        if self._lingering is None:
            self._lingering = self.loop.create_future()
            self._linger_parses = parses
            self._lingered_bytes = 0
            self._unset_keepalive_if_required()
            self._linger_timer = self.loop.call_later(self._limits.linger_seconds, self._end_linger)
            self.flow.resume_reading()  # uvicorn pauses reading while an app leaves a body
        return self._lingering

    def _discard(self, data: bytes, lingering: asyncio.Future[None]) -> None:
        self._lingered_bytes += len(data)
        if lingering.done():  # over: the connection is about to close
            return
        if self._lingered_bytes > self._limits.linger_bytes:
            self._end_linger()
        elif self._linger_parses:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self._end_linger()  # _StopParsing, or bytes that are not HTTP: stop here

    def _end_linger(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._lingering is not None and not self._lingering.done():
            self._lingering.set_result(None)


class EdgeLoop(uvloop.Loop):
    """uvloop, its TLS handshakes bounded by `handshake_timeout` rather than asyncio's 60 s:
    a connection that never sends its ClientHello is closed like one that never sends a
    request. uvicorn starts the handshake before the protocol hears of the connection, so
    the bound can only be the server's (`ssl_handshake_timeout`)."""

    handshake_timeout: float = 60.0

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None:  # uvicorn passes it by name
            kwargs.setdefault("ssl_handshake_timeout", self.handshake_timeout)
        # uvloop's stubs say AbstractServer; asyncio's loop contract (and uvloop) give a Server.
        return cast("asyncio.Server", await super().create_server(*args, **kwargs))


def edge_loop() -> asyncio.AbstractEventLoop:
    """The event loop of a `tally serve` worker. uvicorn calls it by name in each worker
    process, so, like the application (app.app_from_environment), it reads its setting from
    the environment: a handshake must end within TALLY_KEEPALIVE_TIMEOUT_SECONDS."""
    loop = EdgeLoop()
    loop.handshake_timeout = Settings().keepalive_timeout_seconds
    return loop


def check(settings: Settings) -> None:
    """Raises ValueError, saying what to fix, when the server could not start as configured."""
    files = TlsFiles.of(settings)
    if files is not None:
        tls_context(files)


def run(settings: Settings, *, host: str, port: int, workers: int) -> int:
    """Serve the API until SIGTERM (or SIGINT) and a drain (api/drain.py), HTTPS only when
    `settings` name a certificate. Returns the exit status: 0 after a clean drain, 1 when the
    drain ran out of TALLY_DRAIN_SECONDS, 3 when the server could not start.

    Raises ValueError as `check` does, before any worker starts.
    """
    check(settings)
    files = TlsFiles.of(settings)
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_seconds=settings.request_timeout_seconds,
        linger_bytes=max(LINGER_BODIES * settings.max_body_bytes, LINGER_MIN_BYTES),
        linger_seconds=settings.keepalive_timeout_seconds,
        write_stall_seconds=settings.request_timeout_seconds,
    )
    # A partial, not a subclass made here: uvicorn pickles its configuration to each worker.
    protocol = cast("type[asyncio.Protocol]", partial(GuardedHttpToolsProtocol, limits=limits))
    metrics.supervise(settings, workers=workers, api_port=port)  # before any worker starts
    config = uvicorn.Config(
        "tally.api.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="tally.api.server:edge_loop",
        http=protocol,
        # Proxy headers rewrite the client's address (the audit log's source) and scheme:
        # trusted only from the proxies configured, else from nobody.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies),
        access_log=False,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keepalive_timeout_seconds,
        limit_concurrency=settings.max_connections,
        ssl_context_factory=partial(_uvicorn_tls, files) if files is not None else None,
        # uvicorn adds these to every response, its own refusals included; not `server:
        # uvicorn`, which tells a scanner what to try.
        headers=[HSTS] if files is not None else None,
        server_header=False,
    )
    # uvicorn.Config set up uvicorn's own logging; the supervisor's lines are Tally's too.
    configure_logging(settings)
    times = DrainTimes(settings.drain_seconds, settings.drain_notice_seconds)
    if workers > 1:
        supervisor = Workers(config, [config.bind_socket()], times)
        supervisor.run()
        return supervisor.exit_status()
    server = DrainingServer(config, times)
    server.run()
    return server.exit_status()
