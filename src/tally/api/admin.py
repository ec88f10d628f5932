"""Registration, key lifecycle and the audit log: /v1/tenants, /v1/applications, /v1/keys,
/v1/audit (admin scope). Every change is recorded in the audit log with the caller's key id,
client address and request id."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from starlette.status import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from tally.api.deps import AdminDep, ServicesDep, admin, known_query_only
from tally.api.events import JSON, media_type, read_body
from tally.api.problems import request_id_of, responses
from tally.auth.service import Principal
from tally.events.validation import parse_model
from tally.registry.audit import Actor
from tally.registry.models import (
    ApplicationIn,
    ApplicationOut,
    AuditPageOut,
    AuditQuery,
    KeyIn,
    KeyOut,
    NewKeyOut,
    RotateIn,
    TenantIn,
    TenantOut,
    TenantPatch,
)
from tally.registry.service import describe_key

router = APIRouter(tags=["registration"], dependencies=[Depends(known_query_only)])

_UNSUPPORTED = (415, "The body is not application/json")
_CREATED = responses((409, "The id is taken (ERR-VAL-409)"), _UNSUPPORTED)

# The request bodies of the admin routes, described in the OpenAPI components by api/openapi.py.
BODY_MODELS: tuple[type[BaseModel], ...] = (TenantIn, TenantPatch, ApplicationIn, KeyIn, RotateIn)

M = TypeVar("M", bound=BaseModel)


def body(model: type[M], caller: Callable[..., Principal] = admin) -> Callable[..., Awaitable[M]]:
    """A dependency that reads a route's body as `model`, once `caller` (a dependency: an
    admin by default, `principal` for any authenticated key) has run: an unauthenticated or
    unauthorised request is a 401 or 403 whatever its body, which is not even read. Then 415
    unless it is application/json (UTF-8), and 400 with pointers unless `parse_json`
    (strict: no duplicate keys) and the model accept it.

    Declared as a dependency, not as a body parameter, because FastAPI reads and judges a
    body parameter before any dependency runs. `body_doc` describes it in the OpenAPI.
    """

    async def parsed(request: Request, _: Principal = Depends(caller)) -> M:  # noqa: B008
        media_type(request, (JSON,))
        return parse_model(model, await read_body(request))

    return parsed


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route whose body `body(model)` reads."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {JSON: {"schema": schema}}}}


def actor(request: Request, caller: AdminDep) -> Actor:
    """The admin caller as the audit log names it: key id, ASGI client address, request id.

    The address is the TCP peer's: behind a proxy it is the proxy's (X-Forwarded-For is not
    trusted, since any client can send it)."""
    client = request.client.host if request.client is not None else None
    return Actor.api(caller.key_id, client=client, request_id=request_id_of(request))


ActorDep = Annotated[Actor, Depends(actor)]


@router.post(
    "/v1/tenants",
    status_code=HTTP_201_CREATED,
    responses=_CREATED,
    openapi_extra=body_doc(TenantIn),
)
def create_tenant(
    spec: Annotated[TenantIn, Depends(body(TenantIn))], who: ActorDep, services: ServicesDep
) -> TenantOut:
    return TenantOut(**asdict(services.registry.create_tenant(spec, actor=who)))


@router.get("/v1/tenants")
def list_tenants(_: AdminDep, services: ServicesDep) -> list[TenantOut]:
    """Every tenant, shredded ones too (`shredded`: they take no more events)."""
    return services.registry.list_tenants()


_TENANT = responses((404, "No such tenant (ERR-RES-404)"))


@router.get("/v1/tenants/{tenant_id}", responses=_TENANT)
def get_tenant(tenant_id: str, _: AdminDep, services: ServicesDep) -> TenantOut:
    return services.registry.get_tenant(tenant_id)


@router.patch(
    "/v1/tenants/{tenant_id}",
    responses=responses(
        (404, "No such tenant (ERR-RES-404)"),
        (
            409,
            "A longer lateness window, which would re-open final periods (period-final); or "
            "the tenant kept changing while this update was made",
        ),
        _UNSUPPORTED,
    ),
    openapi_extra=body_doc(TenantPatch),
)
def update_tenant(
    tenant_id: str,
    patch: Annotated[TenantPatch, Depends(body(TenantPatch))],
    who: ActorDep,
    services: ServicesDep,
) -> TenantOut:
    """A JSON merge patch of `name` and `lateness_hours`: fields left out stay, `"name":
    null` removes the name. A new lateness window applies to events sent from now on; the
    events stored stay. The window can be shortened, never lengthened: a longer one would let
    events into final periods (409 period-final). Recorded in the audit log as
    `tenant.update`."""
    return services.registry.update_tenant(tenant_id, patch, actor=who)


@router.post(
    "/v1/applications",
    status_code=HTTP_201_CREATED,
    responses=_CREATED,
    openapi_extra=body_doc(ApplicationIn),
)
def create_application(
    spec: Annotated[ApplicationIn, Depends(body(ApplicationIn))],
    who: ActorDep,
    services: ServicesDep,
) -> ApplicationOut:
    return ApplicationOut(**asdict(services.registry.create_application(spec, actor=who)))


@router.get("/v1/applications")
def list_applications(_: AdminDep, services: ServicesDep) -> list[ApplicationOut]:
    return [ApplicationOut(**asdict(a)) for a in services.store.list_applications()]


@router.post(
    "/v1/keys",
    status_code=HTTP_201_CREATED,
    responses=responses(_UNSUPPORTED),
    openapi_extra=body_doc(KeyIn),
)
def create_key(
    spec: Annotated[KeyIn, Depends(body(KeyIn))], who: ActorDep, services: ServicesDep
) -> NewKeyOut:
    """Issue a key. Its secret is in this response only; Tally keeps just its hash."""
    return services.registry.create_key(spec, actor=who)


@router.get("/v1/keys")
def list_keys(_: AdminDep, services: ServicesDep) -> list[KeyOut]:
    """Every key's description, with its last use (to a minute) and rotation chain; never a
    secret."""
    return [describe_key(record) for record in services.store.list_keys()]


@router.post(
    "/v1/keys/{key_id}/rotate",
    status_code=HTTP_201_CREATED,
    responses=responses(
        (404, "No such key (ERR-RES-404)"),
        (409, "The key is revoked, expired or already rotated (ERR-VAL-409)"),
        _UNSUPPORTED,
    ),
    openapi_extra=body_doc(RotateIn),
)
def rotate_key(
    key_id: str,
    spec: Annotated[RotateIn, Depends(body(RotateIn))],
    who: ActorDep,
    services: ServicesDep,
) -> NewKeyOut:
    """Issue a replacement with the same scopes, application, tenants and lifetime; its secret
    is in this response only. The old key keeps working for `grace_seconds` (never beyond its
    own expiry), then gets 401 like any invalid key."""
    grace = timedelta(seconds=spec.grace_seconds)
    return services.registry.rotate_key(key_id, grace=grace, actor=who)


@router.delete(
    "/v1/keys/{key_id}",
    status_code=HTTP_204_NO_CONTENT,
    responses=responses(
        (404, "No such key (ERR-RES-404)"),
        (409, "The last admin key that stays valid: issue or rotate to another one first"),
    ),
)
def revoke_key(key_id: str, who: ActorDep, services: ServicesDep) -> Response:
    """Revoke at once: the next request with this key gets 401. The last admin key that
    stays valid (not revoked, expired or retiring after a rotation) cannot be revoked: a
    409 says so, and the operator issues another one first (or rotates this one)."""
    services.registry.revoke_key(key_id, actor=who)
    return Response(status_code=HTTP_204_NO_CONTENT)


@router.get("/v1/audit", tags=["audit"])
def list_audit(
    query: Annotated[AuditQuery, Query()], _: AdminDep, services: ServicesDep
) -> AuditPageOut:
    """Administrative actions, newest first: who (`actor`), what (`action`, `target`,
    `details`), when (`at`), from where (`source`) and the `request_id`. Follow `next_cursor`
    for older entries. Refused admin attempts (403) are there too, as `access.denied`."""
    return services.registry.audit_page(query)
