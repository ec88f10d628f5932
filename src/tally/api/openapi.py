"""The OpenAPI document, exact enough to generate clients from.

FastAPI describes what a route returns when it succeeds; what it can refuse with comes from
the layers around it (the server edge, the body bound, the key check, the problem mapping).
Those refusals are added here, for every operation by what it takes, so that a route added
later is described like the others without repeating a list of statuses:

- every operation: 408 (headers too slow), 431 (headers too large), 500, 503 (store down,
  shutting down, or the connection cap);
- one that reads input (a body, a parameter, or a key, since `/v1` routes refuse unknown
  query parameters): 400;
- one with a body: 408 (body too slow), 413, 415;
- one that takes a key: 401, 403 (every route with a key requires a scope), 429;
- one with a path parameter: 404.

Route-specific refusals (a 409, a more precise 404) are declared on the route with
`problems.responses(...)`; their descriptions are kept. 405 is not any operation's answer: it
is what a method the document does not list gets on a listed path.

Every problem is described under `application/problem+json` with the `Problem` schema, the
media type it is sent with. Operation ids are the route's name in camelCase (`list_events`
-> `listEvents`): short, and stable as long as the route's name is.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from tally.api.admin import BODY_MODELS
from tally.api.problems import PROBLEM_JSON, Problem
from tally.api.schemas import CLOUDEVENT_BATCH_SCHEMA, BatchIn, BatchOut, CancelIn, SingleOut
from tally.events.validation import CloudEventIn, EventIn
from tally.services.usage import MeterSpec

# Described in components although no route names them as a FastAPI model: the ingest body
# and answer are written by hand (api/schemas.py), and problems are sent as plain responses.
_MODELS: tuple[type[BaseModel], ...] = (
    EventIn,
    BatchIn,
    CloudEventIn,
    SingleOut,
    BatchOut,
    Problem,
    CancelIn,
    *BODY_MODELS,
    MeterSpec,
)

_PROBLEM_SCHEMA = {"$ref": "#/components/schemas/Problem"}

_RATE_LIMIT_HEADERS = {
    "RateLimit-Limit": "The burst of the tightest limit the request was checked against",
    "RateLimit-Remaining": "Units left in it",
    "RateLimit-Reset": "Seconds until it is full again",
}


def operation_id(route: APIRoute) -> str:
    """`list_events` -> `listEvents`: FastAPI's `generate_unique_id_function`."""
    first, *rest = route.name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def _integer_header(description: str, *, required: bool) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "integer"}}


def _refusals(operation: dict[str, Any]) -> dict[str, str]:
    """status -> description of every refusal `operation` can give, by what it takes."""
    body = "requestBody" in operation
    parameters = operation.get("parameters", [])
    keyed = bool(operation.get("security"))
    found = {
        "408": "The headers (or the body) did not arrive in time (ERR-VAL-400)",
        "431": "The request line and headers are too large (ERR-VAL-400)",
        "500": "Unexpected fault (ERR-SYS-500); nothing was stored half-way",
        "503": "Store unreachable, shutting down, or too many connections (ERR-SYS-503); "
        "Retry-After is set",
    }
    if body or parameters or keyed:
        found["400"] = "Invalid input (ERR-VAL-400): see `errors`"
    if body:
        found["413"] = "The body is over the size limit (ERR-VAL-400)"
        found["415"] = "Unsupported Content-Type or Content-Encoding (ERR-VAL-400)"
    if keyed:
        found["401"] = "Missing, unknown, expired or revoked key (ERR-AUTH-401)"
        found["403"] = "The key lacks the scope or the tenant (ERR-AUTH-403)"
        found["429"] = "Over a rate limit of the key or tenant (ERR-RATE-429); nothing was done"
    if any(p.get("in") == "path" for p in parameters):
        found["404"] = "No such resource (ERR-RES-404)"
    return found


def _problem_headers(status: str) -> dict[str, Any]:
    if status == "401":
        return {
            "WWW-Authenticate": {
                "description": 'Bearer realm="tally"',
                "required": True,
                "schema": {"type": "string"},
            }
        }
    if status == "429":
        return {
            "Retry-After": _integer_header(
                "Seconds to wait before retrying (at least 1)", required=True
            ),
            "RateLimit-Limit": _integer_header(
                "The burst of the limit that refused", required=True
            ),
            "RateLimit-Remaining": _integer_header("Units left in it", required=True),
            "RateLimit-Reset": _integer_header("Seconds until it is full again", required=True),
        }
    if status == "503":
        return {"Retry-After": _integer_header("Seconds to wait before retrying", required=False)}
    return {}


def _without_null(parameter: dict[str, Any]) -> None:
    # An optional parameter is one that is left out: a query string cannot send a null (FastAPI
    # writes `anyOf: [X, null]` for `X | None`), and a generated client should not offer one.
    schema = parameter.get("schema", {})
    kept = [s for s in schema.get("anyOf", []) if s != {"type": "null"}]
    if "anyOf" in schema and len(kept) == 1:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        parameter["schema"] = {**kept[0], **rest}


def describe_operation(operation: dict[str, Any]) -> None:
    """Adds `operation`'s refusals and sends each problem under its real media type."""
    for parameter in operation.get("parameters", []):
        _without_null(parameter)
    responses: dict[str, Any] = operation.setdefault("responses", {})
    # Tally answers invalid requests with 400 problem documents, never FastAPI's 422.
    responses.pop("422", None)
    for status, description in _refusals(operation).items():
        responses.setdefault(status, {"description": description})
    for status, response in responses.items():
        if status.isdigit() and int(status) >= 400:
            response["content"] = {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}}
            headers = _problem_headers(status)
            if headers:
                response["headers"] = {**response.get("headers", {}), **headers}
        elif operation.get("security") and status.startswith("2"):
            # Answers to a keyed request carry the fields of the tightest limit checked.
            response["headers"] = {
                **{n: _integer_header(t, required=False) for n, t in _RATE_LIMIT_HEADERS.items()},
                **response.get("headers", {}),
            }


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (built once)."""
    if app.openapi_schema:
        return app.openapi_schema
    found = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas = found.setdefault("components", {}).setdefault("schemas", {})
    for model in _MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["CloudEventBatchIn"] = CLOUDEVENT_BATCH_SCHEMA
    for path in found["paths"].values():
        for operation in path.values():
            describe_operation(operation)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    app.openapi_schema = found
    return found


def install(app: FastAPI) -> None:
    """Serve `document(app)` at the app's openapi_url."""

    def openapi() -> dict[str, Any]:
        return document(app)

    app.openapi = openapi  # type: ignore[method-assign]
