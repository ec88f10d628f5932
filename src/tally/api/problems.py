"""RFC 9457 problem documents: the one place errors become HTTP responses."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route

from tally.errors import (
    Conflict,
    FieldError,
    Forbidden,
    InvalidInput,
    LogRewound,
    NotAcceptable,
    NotFound,
    PeriodFinal,
    RateLimited,
    StoreUnavailable,
    TallyError,
    Unauthenticated,
    UnsupportedMediaType,
)
from tally.events.validation import pointer_of
from tally.metrics import of_state, store_error_kind
from tally.ratelimit.http import rate_limit_fields

log = structlog.get_logger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = "1"


# A field that is left out when it has no value, never sent as null: SkipJsonSchema keeps
# `null` out of the document (and `left_out` its default), so generated clients do not offer it.
Omitted = SkipJsonSchema[None]


def left_out(schema: dict[str, Any]) -> None:
    """`json_schema_extra` of an `Omitted` field."""
    schema.pop("default", None)


class ProblemError(BaseModel):
    """One problem of an invalid request: where (`pointer` or `parameter`) and what."""

    pointer: str | Omitted = Field(
        default=None, description="JSON pointer into the body", json_schema_extra=left_out
    )
    parameter: str | Omitted = Field(
        default=None, description="Query, path or header parameter", json_schema_extra=left_out
    )
    detail: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str
    code: str = Field(description="The requirement's error code, e.g. ERR-VAL-400")
    request_id: str
    errors: list[ProblemError] | Omitted = Field(
        default=None, description="For invalid input: each problem", json_schema_extra=left_out
    )
    resume_cursor: str | Omitted = Field(
        default=None,
        description="For log-rewound: the cursor to continue with, at the last point the "
        "reader and the restored log agree on (entries after it may come again)",
        json_schema_extra=left_out,
    )


# error class -> (HTTP status, code, type slug, title); the most specific class first.
_KINDS: list[tuple[type[TallyError], int, str, str, str]] = [
    (NotAcceptable, 406, "ERR-VAL-400", "not-acceptable", "Not acceptable"),
    (UnsupportedMediaType, 415, "ERR-VAL-400", "unsupported-media-type", "Unsupported media type"),
    (PeriodFinal, 409, "ERR-VAL-409", "period-final", "Period final"),
    (LogRewound, 409, "ERR-VAL-409", "log-rewound", "Log rewound"),
    (Conflict, 409, "ERR-VAL-409", "conflict", "Conflict"),
    (InvalidInput, 400, "ERR-VAL-400", "invalid-input", "Invalid input"),
    (Unauthenticated, 401, "ERR-AUTH-401", "invalid-credentials", "Invalid credentials"),
    (Forbidden, 403, "ERR-AUTH-403", "access-denied", "Access denied"),
    (NotFound, 404, "ERR-RES-404", "not-found", "Resource not found"),
    (RateLimited, 429, "ERR-RATE-429", "rate-limited", "Too many requests"),
    (StoreUnavailable, 503, "ERR-SYS-503", "service-unavailable", "Service unavailable"),
]

_HTTP_KINDS = {
    404: ("ERR-RES-404", "not-found", "Resource not found"),
    405: ("ERR-VAL-400", "method-not-allowed", "Method not allowed"),
    408: ("ERR-VAL-400", "request-timeout", "Request timeout"),
    413: ("ERR-VAL-400", "payload-too-large", "Payload too large"),
    415: ("ERR-VAL-400", "unsupported-media-type", "Unsupported media type"),  # api/encoding.py
}


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))


def problem_response(
    request: Request,
    *,
    status: int,
    code: str,
    slug: str,
    title: str,
    detail: str,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    extensions: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": f"/problems/{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id_of(request),
    }
    if errors:
        body["errors"] = errors
    body |= extensions or {}
    return Response(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def field_errors(errors: list[FieldError]) -> list[dict[str, str]]:
    return [
        {"parameter": e.parameter, "detail": e.detail}
        if e.parameter is not None
        else {"pointer": e.pointer, "detail": e.detail}
        for e in errors
    ]


def from_error(request: Request, error: TallyError) -> Response:
    _count_store_error(request, error)
    for kind, status, code, slug, title in _KINDS:
        if isinstance(error, kind):
            headers: dict[str, str] = {}
            if status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="tally"'
            if status == 503:
                headers["Retry-After"] = RETRY_AFTER_SECONDS
            if isinstance(error, RateLimited):
                headers["Retry-After"] = str(error.retry_after)
                headers |= rate_limit_fields(
                    limit=error.limit, remaining=error.remaining, reset=error.reset
                )
            errors = field_errors(error.errors) if isinstance(error, InvalidInput) else None
            extensions = (
                {"resume_cursor": error.resume_cursor} if isinstance(error, LogRewound) else None
            )
            return problem_response(
                request,
                status=status,
                code=code,
                slug=slug,
                title=title,
                detail=error.detail,
                errors=errors,
                headers=headers,
                extensions=extensions,
            )
    return internal_error(request, error)


def _count_store_error(request: Request, error: BaseException) -> None:
    kind = store_error_kind(error)
    if kind is not None:
        of_state(getattr(request.scope.get("app"), "state", None)).store_error(kind)


def internal_error(request: Request, error: BaseException) -> Response:
    _count_store_error(request, error)
    # The type of the fault and the request id go to the log; its message and trace may hold
    # data from the request, so neither is logged nor returned.
    log.error("unhandled_error", error_type=type(error).__name__, request_id=request_id_of(request))
    return problem_response(
        request,
        status=500,
        code="ERR-SYS-500",
        slug="internal-error",
        title="Internal error",
        detail="An unexpected fault occurred; nothing was stored half-way. Quote the request_id.",
    )


def _allowed_methods(routes: Sequence[BaseRoute], request: Request) -> list[str]:
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": "GET"})
            if match is not Match.NONE:
                methods |= route.methods
    return sorted(methods)


def from_http_error(
    request: Request, error: StarletteHTTPException, routes: Sequence[BaseRoute]
) -> Response:
    """The problem document of an HTTP error (a 404, 405, or a body's 408, 413 or 415);
    `routes` are the app's, for `Allow` on 405."""
    code, slug, title = _HTTP_KINDS.get(
        error.status_code, ("ERR-VAL-400", "invalid-input", "Invalid request")
    )
    headers = dict(error.headers or {})
    if error.status_code == 405:
        # Starlette names only the first route matching the path; GET and POST
        # /v1/events are two routes, so Allow is worked out from all of them.
        headers["Allow"] = ", ".join(_allowed_methods(routes, request))
    return problem_response(
        request,
        status=error.status_code,
        code=code,
        slug=slug,
        title=title,
        detail=str(error.detail),
        headers=headers,
    )


def install(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    """Map every error to a problem document; `routes` are the app's, for `Allow` on 405."""

    async def tally_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, TallyError)  # noqa: S101 - registered for TallyError only
        return from_error(request, error)

    async def validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)  # noqa: S101 - registered for it only
        errors: list[dict[str, str]] = []
        for item in error.errors():
            where, *rest = item["loc"]
            if item["type"] == "json_invalid":
                errors.append({"pointer": "", "detail": "the body is not valid JSON"})
            elif where == "body":
                errors.append({"pointer": pointer_of(tuple(rest)), "detail": item["msg"]})
            else:
                # A parameter by its name: the index of a repeated one (group_by.0) is no
                # parameter's name.
                name = str(rest[0]) if rest else ""
                errors.append({"parameter": name, "detail": item["msg"]})
        return problem_response(
            request,
            status=400,
            code="ERR-VAL-400",
            slug="invalid-input",
            title="Invalid input",
            detail="The request is invalid; see errors.",
            errors=errors,
        )

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)  # noqa: S101 - registered for it only
        return from_http_error(request, error, routes)

    async def unexpected(request: Request, error: Exception) -> Response:
        return internal_error(request, error)

    app.add_exception_handler(TallyError, tally_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def responses(*extra: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's own refusals, for its `responses=`: (status, description) each, e.g. a 409.
    The refusals every route of its kind can give, and the problem media type and schema of
    all of them, are added to the OpenAPI document by api/openapi.py."""
    return {status: {"description": description} for status, description in extra}
