"""API keys: create (shown once), list, revoke. Admin only."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from metering.auth import service as auth
from metering.auth.deps import Admin, AuthStateDep
from metering.auth.models import ApiKey
from metering.db.deps import SessionDep
from metering.errors import ApiError, error_responses

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])

TenantId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
]


class ApiKeyCreate(BaseModel):
    # The rule of the validator below, in the schema: no tenant_id, or only "read" scopes.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"tenant_id": {"type": "null"}}},
                {"properties": {"scopes": {"items": {"const": "read"}}}},
            ]
        }
    )

    scopes: list[Literal["ingest", "read", "admin"]] = Field(min_length=1)
    tenant_id: TenantId | None = Field(
        default=None, description='binds a key with scopes ["read"] to one tenant\'s data'
    )
    # PostgreSQL text cannot hold NUL.
    name: str | None = Field(default=None, max_length=200, pattern=r"^[^\x00]*$")

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
    created_at: AwareDatetime
    revoked_at: AwareDatetime | None


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


@router.post(
    "", status_code=201, response_model=ApiKeyCreated, responses=error_responses(400, 401, 403)
)
def create_api_key(body: ApiKeyCreate, session: SessionDep, _: Admin) -> ApiKeyCreated:
    row, secret = auth.create_key(session, list(body.scopes), body.tenant_id, body.name)
    return ApiKeyCreated(key=secret, **_out(row))


@router.get("", response_model=ApiKeyList, responses=error_responses(401, 403))
def list_api_keys(session: SessionDep, _: Admin) -> ApiKeyList:
    return ApiKeyList(api_keys=[ApiKeyOut(**_out(r)) for r in auth.list_keys(session)])


_KEY_ID = re.compile(r"key_[0-9a-f]{24}")


@router.delete(
    "/{key_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(401, 403, 404),
)
def revoke_api_key(key_id: str, session: SessionDep, state: AuthStateDep, _: Admin) -> Response:
    # An id that cannot be a key's is not looked up (nor sent to the database as is).
    if not _KEY_ID.fullmatch(key_id) or not auth.revoke_key(session, key_id):
        raise ApiError(404, "key_id: no such API key")
    session.commit()
    state.key_cache.forget_key(key_id)
    return Response(status_code=204)
