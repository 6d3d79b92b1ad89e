"""API keys: create (shown once), list, revoke. Admin only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field, StringConstraints, model_validator

from metering.auth import service as auth
from metering.auth.models import ApiKey
from metering.deps import Admin, ServicesDep, SessionDep

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])

TenantId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
]


class ApiKeyCreate(BaseModel):
    scopes: list[Literal["ingest", "read", "admin"]] = Field(min_length=1)
    tenant_id: TenantId | None = None
    name: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _only_read_keys_bind_to_a_tenant(self) -> ApiKeyCreate:
        if self.tenant_id is not None and set(self.scopes) != {"read"}:
            raise ValueError('tenant_id: only keys with scopes ["read"] can be bound to a tenant')
        return self


class ApiKeyOut(BaseModel):
    id: str
    prefix: str
    scopes: list[str]
    tenant_id: str | None
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the secret, shown only in this response")


class ApiKeyList(BaseModel):
    api_keys: list[ApiKeyOut]


def _out(row: ApiKey) -> dict[str, object]:
    return {
        "id": row.id,
        "prefix": row.prefix,
        "scopes": row.scopes,
        "tenant_id": row.tenant_id,
        "name": row.name,
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
    }


@router.post("", status_code=201, response_model=ApiKeyCreated)
def create_api_key(body: ApiKeyCreate, session: SessionDep, _: Admin) -> ApiKeyCreated:
    row, secret = auth.create_key(session, list(body.scopes), body.tenant_id, body.name)
    return ApiKeyCreated(key=secret, **_out(row))


@router.get("", response_model=ApiKeyList)
def list_api_keys(session: SessionDep, _: Admin) -> ApiKeyList:
    return ApiKeyList(api_keys=[ApiKeyOut(**_out(r)) for r in auth.list_keys(session)])


@router.delete("/{key_id}", status_code=204, response_class=Response)
def revoke_api_key(key_id: str, session: SessionDep, services: ServicesDep, _: Admin) -> Response:
    if not auth.revoke_key(session, key_id):
        raise HTTPException(404, f"no API key {key_id}")
    session.commit()
    services.key_cache.forget_key(key_id)
    return Response(status_code=204)
