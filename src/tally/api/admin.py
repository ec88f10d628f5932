"""Registration, key lifecycle and the audit log: /v1/tenants, /v1/applications, /v1/keys,
/v1/audit (admin scope). Every change is recorded in the audit log with the caller's key id,
client address and request id."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.status import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from tally.api.deps import AdminDep, ServicesDep, known_query_only
from tally.api.problems import request_id_of, responses
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
)
from tally.registry.service import describe_key

router = APIRouter(tags=["registration"], dependencies=[Depends(known_query_only)])

_CREATED = responses((409, "The id is taken (ERR-VAL-400)"))


def actor(request: Request, caller: AdminDep) -> Actor:
    """The admin caller as the audit log names it: key id, ASGI client address, request id.

    The address is the TCP peer's: behind a proxy it is the proxy's (X-Forwarded-For is not
    trusted, since any client can send it)."""
    client = request.client.host if request.client is not None else None
    return Actor.api(caller.key_id, client=client, request_id=request_id_of(request))


ActorDep = Annotated[Actor, Depends(actor)]


@router.post("/v1/tenants", status_code=HTTP_201_CREATED, responses=_CREATED)
def create_tenant(spec: TenantIn, who: ActorDep, services: ServicesDep) -> TenantOut:
    return TenantOut(**asdict(services.registry.create_tenant(spec, actor=who)))


@router.get("/v1/tenants", responses=responses())
def list_tenants(_: AdminDep, services: ServicesDep) -> list[TenantOut]:
    return [TenantOut(**asdict(t)) for t in services.store.list_tenants()]


@router.post("/v1/applications", status_code=HTTP_201_CREATED, responses=_CREATED)
def create_application(spec: ApplicationIn, who: ActorDep, services: ServicesDep) -> ApplicationOut:
    return ApplicationOut(**asdict(services.registry.create_application(spec, actor=who)))


@router.get("/v1/applications", responses=responses())
def list_applications(_: AdminDep, services: ServicesDep) -> list[ApplicationOut]:
    return [ApplicationOut(**asdict(a)) for a in services.store.list_applications()]


@router.post("/v1/keys", status_code=HTTP_201_CREATED, responses=responses())
def create_key(spec: KeyIn, who: ActorDep, services: ServicesDep) -> NewKeyOut:
    """Issue a key. Its secret is in this response only; Tally keeps just its hash."""
    return services.registry.create_key(spec, actor=who)


@router.get("/v1/keys", responses=responses())
def list_keys(_: AdminDep, services: ServicesDep) -> list[KeyOut]:
    """Every key's description, with its last use (to a minute) and rotation chain; never a
    secret."""
    return [describe_key(record) for record in services.store.list_keys()]


@router.post(
    "/v1/keys/{key_id}/rotate",
    status_code=HTTP_201_CREATED,
    responses=responses(
        (404, "No such key (ERR-RES-404)"),
        (409, "The key is revoked, expired or already rotated (ERR-VAL-400)"),
    ),
)
def rotate_key(key_id: str, spec: RotateIn, who: ActorDep, services: ServicesDep) -> NewKeyOut:
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


@router.get("/v1/audit", tags=["audit"], responses=responses())
def list_audit(
    query: Annotated[AuditQuery, Query()], _: AdminDep, services: ServicesDep
) -> AuditPageOut:
    """Administrative actions, newest first: who (`actor`), what (`action`, `target`,
    `details`), when (`at`), from where (`source`) and the `request_id`. Follow `next_cursor`
    for older entries. Refused admin attempts (403) are there too, as `access.denied`."""
    return services.registry.audit_page(query)
