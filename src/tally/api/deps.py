"""FastAPI dependencies: the services of this app and the caller's principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tally.auth.service import Principal, Scope
from tally.bootstrap import Services

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tly_…`")


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Raises Unauthenticated (401) for any key that is not valid now."""
    return services(request).authenticator.authenticate(request.headers.get("authorization"))


ServicesDep = Annotated[Services, Depends(services)]
PrincipalDep = Annotated[Principal, Depends(principal)]


def admin(caller: PrincipalDep) -> Principal:
    """The caller, if it holds the admin scope; checked before the body is even validated."""
    caller.require(Scope.ADMIN)
    return caller


AdminDep = Annotated[Principal, Depends(admin)]
