"""FastAPI dependencies: the services of this app and the caller's principal."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from tally.api.problems import request_id_of
from tally.auth.service import Principal, Scope
from tally.bootstrap import Services
from tally.errors import FieldError, InvalidInput
from tally.ratelimit.http import note_of
from tally.ratelimit.policy import request_tenant
from tally.registry.audit import Actor

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tly_…`")


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Raises Unauthenticated (401) for any key that is not valid now, and RateLimited (429)
    once the key, or the tenant the request is for, is over its request rate: checked here,
    before any body is read (ratelimit/policy.py says which tenant a request is for)."""
    return admitted(request, services(request))


def admitted(request: Request, found: Services, caller: Principal | None = None) -> Principal:
    """`principal`'s work: `caller`, or the key the request presents, charged one request."""
    if caller is None:
        caller = found.authenticator.authenticate(request.headers.get("authorization"))
    query = request.query_params.get("tenant") if request.scope.get("query_string") else None
    tenant = request_tenant(caller, query)
    found.rate_limits.admit_request(caller, tenant=tenant, note=note_of(request))
    return caller


async def principal_on_loop(request: Request, found: Services) -> Principal:
    """`principal` for a caller on the event loop: answered there when this process's
    memory holds all it needs (a fresh copy of the key, an in-process limiter), else in a
    worker thread, which reads the store or asks Redis."""
    caller = found.authenticator.cached(request.headers.get("authorization"))
    if caller is not None and found.rate_limits.local:
        return admitted(request, found, caller)
    return await asyncio.to_thread(admitted, request, found, caller)


ServicesDep = Annotated[Services, Depends(services)]
PrincipalDep = Annotated[Principal, Depends(principal)]


def admin(request: Request, caller: PrincipalDep) -> Principal:
    """The caller, if it holds the admin scope; checked before the body is even read.

    A refusal (403) is recorded in the audit log as `access.denied`, coalesced to at most a
    row per key, route and minute with a count (registry/audit.py: DenialLog). Only a valid
    key gets this far (a bad one is a 401, never logged), so the entries are attributable to
    a key and cannot be made by anonymous callers; failing to record one never changes the
    answer.
    """
    if Scope.ADMIN not in caller.scopes:
        client = request.client.host if request.client is not None else None
        who = Actor.api(caller.key_id, client=client, request_id=request_id_of(request))
        route = request.scope.get("route")
        # The route's template, not the path: a caller cannot make up rows by varying ids.
        template = route.path if isinstance(route, APIRoute) else request.url.path[:200]
        services(request).registry.deny(who, route=template, method=request.method)
    caller.require(Scope.ADMIN)
    return caller


AdminDep = Annotated[Principal, Depends(admin)]


def _query_names(dependant: Dependant) -> set[str]:
    names: set[str] = set()
    for param in dependant.query_params:
        model = param.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):  # a Query() model
            names |= {field.alias or name for name, field in model.model_fields.items()}
        else:
            names.add(param.alias)
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _known_query(route: APIRoute) -> frozenset[str]:
    # Worked out once per route, not per request (the names never change after start-up),
    # and kept on the route itself: routes are not hashable, and an id() could be reused.
    known: frozenset[str] | None = getattr(route, "_tally_query_names", None)
    if known is None:
        known = frozenset(_query_names(route.dependant))
        route._tally_query_names = known  # type: ignore[attr-defined]
    return known


def known_query_only(request: Request) -> None:
    """Raises InvalidInput naming each query parameter the route does not take.

    A misspelt filter (`?tenat=acme`) would otherwise be ignored and silently widen an export
    to everything the key may read: for a billing system, a wrong answer that looks right.
    """
    route = request.scope.get("route")
    refuse_unknown_query(request, _known_query(route) if isinstance(route, APIRoute) else None)


def refuse_unknown_query(request: Request, known: frozenset[str] | None) -> None:
    """Raises InvalidInput naming each query parameter of `request` not in `known` (None:
    the route takes none)."""
    if not request.scope.get("query_string"):
        return
    unknown = sorted(set(request.query_params) - (known or frozenset()))
    if unknown:
        raise InvalidInput(
            "The request names query parameters this route does not take.",
            [FieldError("", "is not a parameter of this route", parameter=n[:64]) for n in unknown],
        )
