"""Registration and key lifecycle: /v1/tenants, /v1/applications, /v1/keys (admin scope)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Response
from starlette.status import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from tally.api.deps import AdminDep, ServicesDep
from tally.api.problems import responses
from tally.registry.models import (
    ApplicationIn,
    ApplicationOut,
    KeyIn,
    KeyOut,
    NewKeyOut,
    TenantIn,
    TenantOut,
)
from tally.registry.service import describe_key

router = APIRouter(tags=["registration"])

_CREATED = responses((409, "The id is taken (ERR-VAL-400)"))


@router.post("/v1/tenants", status_code=HTTP_201_CREATED, responses=_CREATED)
def create_tenant(spec: TenantIn, _: AdminDep, services: ServicesDep) -> TenantOut:
    return TenantOut(**asdict(services.registry.create_tenant(spec)))


@router.get("/v1/tenants", responses=responses())
def list_tenants(_: AdminDep, services: ServicesDep) -> list[TenantOut]:
    return [TenantOut(**asdict(t)) for t in services.store.list_tenants()]


@router.post("/v1/applications", status_code=HTTP_201_CREATED, responses=_CREATED)
def create_application(spec: ApplicationIn, _: AdminDep, services: ServicesDep) -> ApplicationOut:
    return ApplicationOut(**asdict(services.registry.create_application(spec)))


@router.get("/v1/applications", responses=responses())
def list_applications(_: AdminDep, services: ServicesDep) -> list[ApplicationOut]:
    return [ApplicationOut(**asdict(a)) for a in services.store.list_applications()]


@router.post("/v1/keys", status_code=HTTP_201_CREATED, responses=responses())
def create_key(spec: KeyIn, _: AdminDep, services: ServicesDep) -> NewKeyOut:
    """Issue a key. Its secret is in this response only; Tally keeps just its hash."""
    return services.registry.create_key(spec)


@router.get("/v1/keys", responses=responses())
def list_keys(_: AdminDep, services: ServicesDep) -> list[KeyOut]:
    """Every key's description; never a secret."""
    return [describe_key(record) for record in services.store.list_keys()]


@router.delete(
    "/v1/keys/{key_id}",
    status_code=HTTP_204_NO_CONTENT,
    responses=responses((404, "No such key (ERR-RES-404)")),
)
def revoke_key(key_id: str, _: AdminDep, services: ServicesDep) -> Response:
    """Revoke at once: the next request with this key gets 401."""
    services.registry.revoke_key(key_id)
    return Response(status_code=HTTP_204_NO_CONTENT)
