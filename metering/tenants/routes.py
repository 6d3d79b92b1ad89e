"""`PUT /v1/tenants/{tenant_id}` (admin): the billing details an invoice shows.

The tenant must be known (registered on its first event): 404 otherwise. Drafts and
previews show the current details; a finalized invoice keeps those it was issued with.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from billing.invoices import repository as repo
from metering.auth.deps import Admin
from metering.db.deps import SessionDep
from metering.errors import ApiError, error_responses
from metering.tenants.models import Tenant

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


_ADDR = r"[^@\s\x00-\x1f\x7f-\x9f]"


class BillingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str | None, Field(min_length=1, max_length=200)] = None
    # No spaces and no control characters (listed too: Python's \s takes U+001C-U+001F
    # and U+0085, JSON Schema's does not, and both must read the pattern alike).
    email: Annotated[
        str | None, Field(max_length=254, pattern=rf"^{_ADDR}+@{_ADDR}+\.{_ADDR}+$")
    ] = None
    address: Annotated[str | None, Field(max_length=1000)] = None
    currency: Annotated[str, Field(pattern=r"^USD$", description="USD (the only currency yet)")] = (
        "USD"
    )


@router.put("/{tenant_id}", responses=error_responses(400, 401, 403, 404))
def put_tenant(
    tenant_id: Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")],
    body: BillingIn,
    session: SessionDep,
    _: Admin,
) -> dict[str, Any]:
    if session.get(Tenant, tenant_id) is None:
        raise ApiError(404, f"tenant_id: no tenant {tenant_id}")
    row = repo.put_billing(session, tenant_id, body.name, body.email, body.address, body.currency)
    return {
        "tenant_id": tenant_id,
        "name": row.name,
        "email": row.email,
        "address": row.address,
        "currency": row.currency,
    }
