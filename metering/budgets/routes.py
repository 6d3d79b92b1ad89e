"""`/v1/budgets` (create, list, show, edit, end) and `POST /v1/authorize`.

Authorize answers from the in-memory spend ledger only (no database, no ClickHouse):
`allowed` is false iff a hard-limit budget covering the tenant (or the project) has
spend >= amount in the current period, counting every event acknowledged before the
call. Until the ledger has been built from ClickHouse after a start it answers 503.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, Protocol, cast

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints
from sqlalchemy.orm import Session, sessionmaker

from billing.alerts.channels import ChannelError, public_channel, validate_channels
from billing.alerts.outbox import deliveries_for
from billing.budgets import service
from billing.budgets.forecast import period_of
from billing.budgets.models import BudgetRow
from billing.rating import EXACT, money
from metering.auth.deps import Admin, Reader
from metering.auth.service import Principal
from metering.budgets.authorize import AuthorizeState, answer, ready
from metering.budgets.runtime import BudgetRuntime
from metering.db.deps import SessionDep
from metering.errors import ApiError, error_responses
from metering.ingest.structs import ACCOUNT_PATTERN

router = APIRouter(tags=["budgets"])
# Included first: the gateway calls it before every request, so it is matched first.
authorize_router = APIRouter(tags=["budgets"])

MAX_THRESHOLDS = 10
_AMOUNT = re.compile(r"^-?\d{1,18}(\.\d{1,12})?$")
# What the schema states: a positive decimal string (the code says why in its 400s).
POSITIVE = r"^(?:[1-9][0-9]{0,17}(?:\.[0-9]{1,12})?|0\.(?:0{0,11}[1-9][0-9]{0,11}))$"
_CHANNELS_SCHEMA: dict[str, Any] = {
    "maxItems": 20,
    "items": {
        "oneOf": [
            {
                "type": "object",
                "required": ["type", "url", "secret"],
                "additionalProperties": False,
                "properties": {
                    "type": {"const": "webhook"},
                    "url": {"type": "string", "pattern": "^https?://", "maxLength": 2048},
                    "secret": {"type": "string", "minLength": 1, "maxLength": 256},
                },
            },
            {
                "type": "object",
                "required": ["type", "url"],
                "additionalProperties": False,
                "properties": {
                    "type": {"const": "slack"},
                    "url": {"type": "string", "pattern": "^https://", "maxLength": 2048},
                },
            },
            {
                "type": "object",
                "required": ["type", "to"],
                "additionalProperties": False,
                "properties": {
                    "type": {"const": "email"},
                    "to": {"type": "string", "format": "email", "maxLength": 254},
                },
            },
        ]
    },
}
AccountId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=ACCOUNT_PATTERN.replace("\\Z", "$"))
]
# A JSON number in (0, 1]; read as the decimal it was written as (0.8 -> Decimal("0.8")).
Threshold = Annotated[
    float, Field(gt=0, le=1, strict=True, description="a fraction of the amount, in (0, 1]")
]


class BudgetState(Protocol):
    budgets: BudgetRuntime
    sessions: sessionmaker[Session]


async def _state(request: Request) -> BudgetState:
    return cast(BudgetState, request.app.state.services)


StateDep = Annotated[BudgetState, Depends(_state)]


def _amount(text: str) -> Decimal:
    if not isinstance(text, str) or not _AMOUNT.match(text):
        raise ApiError(
            400, 'amount_usd: must be a decimal string with at most 12 decimals, e.g. "100.00"'
        )
    try:
        value = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise ApiError(400, "amount_usd: must be a decimal string") from None
    if value <= 0:
        raise ApiError(400, "amount_usd: must be greater than 0")
    return value


def _thresholds(values: list[float]) -> list[Decimal]:
    if len(set(values)) != len(values):
        raise ApiError(400, "thresholds: must not repeat a value")
    return [Decimal(repr(v)) for v in values]


def _channels(raw: list[dict[str, Any]], allow_private: bool) -> list[dict[str, Any]]:
    try:
        return validate_channels(raw, allow_private=allow_private)
    except ChannelError as exc:
        raise ApiError(400, exc.errors) from None


class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: AccountId
    project_id: AccountId | None = None
    amount_usd: str = Field(
        description='a positive decimal string, e.g. "100.00"',
        max_length=32,
        json_schema_extra={"pattern": POSITIVE},
    )
    period: Literal["monthly"] = "monthly"
    thresholds: list[Threshold] = Field(
        default_factory=lambda: [0.5, 0.8, 1.0],
        max_length=MAX_THRESHOLDS,
        json_schema_extra={"uniqueItems": True},
    )
    hard_limit: StrictBool = False
    channels: list[dict[str, Any]] = Field(
        default_factory=list, max_length=20, json_schema_extra=_CHANNELS_SCHEMA
    )


class BudgetPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_usd: str | None = Field(
        default=None, max_length=32, json_schema_extra={"pattern": POSITIVE}
    )
    thresholds: list[Threshold] | None = Field(
        default=None, max_length=MAX_THRESHOLDS, json_schema_extra={"uniqueItems": True}
    )
    hard_limit: StrictBool | None = None
    channels: list[dict[str, Any]] | None = Field(
        default=None, max_length=20, json_schema_extra=_CHANNELS_SCHEMA
    )


class AuthorizeIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tenant_id: AccountId
    project_id: AccountId | None = None


class BudgetStanding(BaseModel):
    id: str
    spend_usd: str
    amount_usd: str
    remaining_usd: str


class AuthorizeOut(BaseModel):
    allowed: bool
    reason: str | None
    budgets: list[BudgetStanding]


def _view(row: BudgetRow, state: BudgetState, session: Session, *, detail: bool) -> dict[str, Any]:
    runtime = state.budgets
    limit = service.to_limit(row)
    spend, unpriced = runtime.ledger.spend(limit.scope)
    out: dict[str, Any] = {
        "id": row.id,
        "tenant_id": row.tenant_id,
        "project_id": row.project_id,
        "amount_usd": money(row.amount_usd),
        "period": row.period,
        "current_period": period_of(runtime.now()),
        "thresholds": [float(Decimal(t)) for t in row.thresholds],
        "hard_limit": row.hard_limit,
        "channels": [public_channel(c) for c in row.channels],
        "created_at": service.iso(row.created_at),
        "updated_at": service.iso(row.updated_at),
        "spend_usd": money(spend),
        "remaining_usd": money(max(Decimal(0), EXACT.subtract(row.amount_usd, spend))),
        "unpriced_usage": unpriced,
    }
    if detail:
        out["forecast_usd"] = money(runtime.forecast(limit))
        alerts = service.alerts_of(session, row.id)
        deliveries = deliveries_for(session, [a.id for a in alerts])
        out["alerts"] = [
            {
                "id": a.id,
                "type": service.THRESHOLD_TYPE if a.kind == "threshold" else service.FORECAST_TYPE,
                "period": a.period,
                "threshold": float(Decimal(a.threshold)) if a.threshold else None,
                "spend_usd": money(a.spend_usd),
                "amount_usd": money(a.amount_usd),
                "forecast_usd": money(a.forecast_usd) if a.forecast_usd is not None else None,
                "at": service.iso(a.at),
                "rearmed_at": service.iso(a.rearmed_at) if a.rearmed_at else None,
                "deliveries": deliveries.get(a.id, []),
            }
            for a in alerts
        ]
    return out


def _ready(state: BudgetState) -> BudgetRuntime:
    return ready(state.budgets)


def _visible(session: Session, budget_id: str, principal: Principal) -> BudgetRow:
    row = service.get(session, budget_id)
    if row is None or (principal.tenant_id is not None and row.tenant_id != principal.tenant_id):
        raise ApiError(404, "budget_id: no such budget")
    return row


@router.post(
    "/v1/budgets",
    status_code=201,
    responses=error_responses(400, 401, 403, 503),
    summary="Create a budget (tenant-wide, or for one project)",
)
def create_budget(body: BudgetIn, state: StateDep, session: SessionDep, _: Admin) -> dict[str, Any]:
    runtime = _ready(state)
    new = service.NewBudget(
        tenant_id=body.tenant_id,
        project_id=body.project_id,
        amount_usd=_amount(body.amount_usd),
        thresholds=_thresholds(body.thresholds),
        hard_limit=body.hard_limit,
        channels=_channels(body.channels, runtime.allow_private),
    )
    row = service.create(session, new, runtime.now())
    limit = service.to_limit(row)
    runtime.budget_saved(limit)
    session.commit()
    runtime.budget_committed(limit)
    return _view(row, state, session, detail=True)


@router.get(
    "/v1/budgets",
    responses=error_responses(400, 401, 403, 503),
    summary="List live budgets (a read key sees its tenant's)",
)
def list_budgets(
    state: StateDep,
    session: SessionDep,
    principal: Reader,
    tenant_id: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    _ready(state)
    tenant = principal.tenant_scope(tenant_id)
    rows = service.live(session, tenant)
    return {"budgets": [_view(r, state, session, detail=False) for r in rows]}


@router.get(
    "/v1/budgets/{budget_id}",
    responses=error_responses(401, 403, 404, 503),
    summary="A budget with its spend, remaining amount, month-end forecast and alerts",
)
def get_budget(
    budget_id: str, state: StateDep, session: SessionDep, principal: Reader
) -> dict[str, Any]:
    _ready(state)
    return _view(_visible(session, budget_id, principal), state, session, detail=True)


@router.patch(
    "/v1/budgets/{budget_id}",
    responses=error_responses(400, 401, 403, 404, 503),
    summary="Change amount, thresholds, hard limit or channels (the period's spend is kept)",
)
def patch_budget(
    budget_id: str, body: BudgetPatch, state: StateDep, session: SessionDep, principal: Admin
) -> dict[str, Any]:
    runtime = _ready(state)
    row = _visible(session, budget_id, principal)
    changes: dict[str, Any] = {}
    fields = body.model_fields_set
    for name in fields:
        if getattr(body, name) is None:
            raise ApiError(400, f"{name}: must not be null")
    if "amount_usd" in fields:
        changes["amount_usd"] = _amount(cast(str, body.amount_usd))
    if "thresholds" in fields:
        changes["thresholds"] = _thresholds(cast(list[float], body.thresholds))
    if "hard_limit" in fields:
        changes["hard_limit"] = body.hard_limit
    if "channels" in fields:
        channels = cast(list[dict[str, Any]], body.channels)
        changes["channels"] = _channels(channels, runtime.allow_private)
    limit = service.to_limit(row)
    spend, _ = runtime.ledger.spend(limit.scope)
    service.update(session, row, changes, spend, runtime.now())
    limit = service.to_limit(row)
    runtime.budget_saved(limit)
    session.commit()
    runtime.budget_committed(limit)
    return _view(row, state, session, detail=True)


@router.delete(
    "/v1/budgets/{budget_id}",
    status_code=204,
    responses=error_responses(401, 403, 404),
    summary="End a budget (its alerts stay in the history)",
)
def delete_budget(
    budget_id: str, state: StateDep, session: SessionDep, principal: Admin
) -> Response:
    row = _visible(session, budget_id, principal)
    service.end(session, row, state.budgets.now())
    session.commit()
    state.budgets.budget_ended(row.id)
    return Response(status_code=204)


@authorize_router.post(
    "/v1/authorize",
    response_model=AuthorizeOut,
    responses=error_responses(400, 401, 403, 503),
    summary="May this tenant (and project) spend now? Hard limits, read-your-writes",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": AuthorizeIn.model_json_schema()}},
        },
        "security": [{"HTTPBearer": []}],
    },
)
async def authorize(request: Request) -> Response:
    """Served by metering.budgets.authorize.AuthorizeFastPath ahead of FastAPI (this route
    documents it, and answers the same way where the fast path is not installed)."""
    state = cast(AuthorizeState, request.app.state.services)
    payload = await answer(state, request.headers.get("authorization", ""), await request.body())
    return Response(payload, media_type="application/json")
