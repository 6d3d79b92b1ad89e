"""`GET /v1/requests` (the request log) and `GET /v1/incidents` (provider incidents).

Both read ClickHouse through the analytics read pool, off the event loop, after the
freshness barrier (every event and probe accepted before the request is stored).
The request log is tenant data: a read key bound to a tenant sees only that tenant
(no `tenant_id` means its own; another tenant's is 403); the admin sees the platform or
`tenant_id=`. Incidents are provider health, not tenant data: any reader sees them all.
Bodies are encoded by msgspec; the pydantic models below document them in the OpenAPI
schema.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from metering.analytics import requests as log
from metering.analytics.deps import AnalyticsState, AnalyticsStateDep, fresh
from metering.analytics.incidents import Incident, read_incidents
from metering.analytics.window import WINDOWS, Window, resolve
from metering.auth.deps import Reader
from metering.errors import ApiError, error_responses

router = APIRouter(prefix="/v1", tags=["analytics"])

_encoder = msgspec.json.Encoder()
_ACCOUNT = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_PROVIDER = re.compile(r"[a-z0-9_-]{1,64}")
_RULES = {
    "tenant_id": (_ACCOUNT, "must be 1-64 characters of [A-Za-z0-9_.:-]"),
    "project_id": (_ACCOUNT, "must be 1-64 characters of [A-Za-z0-9_.:-]"),
    "provider": (_PROVIDER, "must be 1-64 characters of [a-z0-9_-]"),
}
MAX_MODEL_CHARS = 128

# The rules the handlers check (with their own messages), also stated in the schema.
_ACCOUNT_SCHEMA = {"pattern": r"^[A-Za-z0-9_.:-]+$", "minLength": 1, "maxLength": 64}
_PROVIDER_SCHEMA = {"pattern": r"^[a-z0-9_-]+$", "minLength": 1, "maxLength": 64}
TenantQuery = Annotated[str | None, Query(json_schema_extra=_ACCOUNT_SCHEMA)]
ProjectQuery = Annotated[str | None, Query(json_schema_extra=_ACCOUNT_SCHEMA)]
ProviderQuery = Annotated[str | None, Query(json_schema_extra=_PROVIDER_SCHEMA)]
ModelQuery = Annotated[
    str | None, Query(json_schema_extra={"minLength": 1, "maxLength": MAX_MODEL_CHARS})
]
StatusQuery = Annotated[str | None, Query(json_schema_extra={"enum": list(log.STATUSES)})]
WindowQuery = Annotated[
    str | None,
    Query(description="instead of from/to", json_schema_extra={"enum": list(WINDOWS)}),
]
FromQuery = Annotated[
    str | None,
    Query(alias="from", description="RFC 3339", json_schema_extra={"format": "date-time"}),
]
ToQuery = Annotated[
    str | None,
    Query(alias="to", description="RFC 3339, exclusive", json_schema_extra={"format": "date-time"}),
]
LimitQuery = Annotated[
    int | None,
    Query(
        description=f"default {log.DEFAULT_LIMIT}",
        json_schema_extra={"minimum": 1, "maximum": log.MAX_LIMIT},
    ),
]


class FallbackOut(BaseModel):
    provider: str
    model: str | None
    region: str | None
    latency_ms: float
    error_type: str | None
    http_status: int | None


class EventOut(BaseModel):
    event_id: str
    timestamp: str = Field(description="RFC 3339, UTC, millisecond precision")
    tenant_id: str
    project_id: str
    api_key_id: str | None
    provider: str
    model: str
    region: str
    status: Literal["ok", "error"]
    http_status: int | None
    error_type: str | None
    queries: int
    documents: int
    input_tokens: int
    output_tokens: int
    latency_ms: float
    fallbacks: list[FallbackOut]


class RequestPage(BaseModel):
    requests: list[EventOut] = Field(description="newest first: (timestamp, event_id) desc")
    next_cursor: str | None = Field(
        description="pass as `cursor` with the same filters for the next page; null at the end"
    )


class IncidentOut(BaseModel):
    provider: str
    region: str
    started_at: str = Field(description="the first failed probe of the run")
    ended_at: str | None = Field(description="the ok probe that closed it; null while open")
    failed_probes: int


class IncidentList(BaseModel):
    incidents: list[IncidentOut] = Field(description="overlapping the window, started_at desc")


def _check(field: str, value: str | None) -> list[str]:
    if value is None:
        return []
    if field == "model":
        ok = 1 <= len(value) <= MAX_MODEL_CHARS
        return [] if ok else [f"model: must be 1-{MAX_MODEL_CHARS} characters"]
    pattern, rule = _RULES[field]
    return [] if pattern.fullmatch(value) else [f"{field}: {rule}"]


def _json(body: object) -> Response:
    return Response(_encoder.encode(body), media_type="application/json")


def _read_page(
    state: AnalyticsState,
    filters: log.Filters,
    window: Window,
    limit: int,
    digest: str,
    after: log.Cursor | None,
) -> log.Page:
    with state.reads.client() as client:
        return log.read_page(client, filters, window, limit, digest, after, state.hours)


@router.get(
    "/requests",
    response_model=RequestPage,
    responses=error_responses(400, 401, 403, 503),
    summary="Stored events, newest first, in keyset pages",
)
async def list_requests(
    state: AnalyticsStateDep,
    principal: Reader,
    tenant_id: TenantQuery = None,
    project_id: ProjectQuery = None,
    provider: ProviderQuery = None,
    model: ModelQuery = None,
    status: StatusQuery = None,
    start: FromQuery = None,
    end: ToQuery = None,
    window: WindowQuery = None,
    limit: LimitQuery = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> Response:
    errors: list[str] = []
    for field, value in (
        ("tenant_id", tenant_id),
        ("project_id", project_id),
        ("provider", provider),
        ("model", model),
    ):
        errors += _check(field, value)
    for check in (
        lambda: log.check_status(status),
        lambda: log.check_limit(limit),
        lambda: resolve(window, start, end),
    ):
        try:
            check()
        except ApiError as exc:
            errors += exc.errors
    if errors:
        raise ApiError(400, errors)
    filters = log.Filters(
        principal.tenant_scope(tenant_id), project_id, provider, model, log.check_status(status)
    )
    digest = filters.digest([window, start, end])
    after = None if cursor is None else log.Cursor.decode(cursor, digest)
    if after is None:
        span = resolve(window, start, end)
    else:  # the walk's window, as its first page fixed it
        span = Window(log.from_ms(after.from_ms), log.from_ms(after.to_ms))
    await fresh(state)
    page = await run_in_threadpool(
        _read_page, state, filters, span, log.check_limit(limit), digest, after
    )
    return _json({"requests": page.events, "next_cursor": page.next_cursor})


def _read_incidents(state: AnalyticsState, window: Window, provider: str | None) -> list[Incident]:
    with state.reads.client() as client:
        return read_incidents(client, window, provider)


@router.get(
    "/incidents",
    response_model=IncidentList,
    responses=error_responses(400, 401, 403, 503),
    summary="Provider incidents (3 consecutive failed probes) overlapping the window",
)
async def list_incidents(
    state: AnalyticsStateDep,
    _: Reader,
    provider: ProviderQuery = None,
    start: FromQuery = None,
    end: ToQuery = None,
    window: WindowQuery = None,
) -> Response:
    errors = _check("provider", provider)
    try:
        span = resolve(window, start, end)
    except ApiError as exc:
        errors += exc.errors
    if errors:
        raise ApiError(400, errors)
    await fresh(state)
    incidents = await run_in_threadpool(_read_incidents, state, span, provider)
    return _json({"incidents": [i.as_json() for i in incidents]})
