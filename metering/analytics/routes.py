"""`GET /v1/stats`, `/v1/usage`, `/v1/providers`: the seed page's figures, from data.

Each read waits until every event accepted before it is stored (at most 5 s), resolves
the tenant it may see (a read key: its own; the admin: the platform or `tenant_id=`),
then queries ClickHouse in a worker thread from the read pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from metering.analytics import service
from metering.analytics.deps import AnalyticsState, AnalyticsStateDep, fresh
from metering.analytics.facts import GROUP_KEYS, probe_counts
from metering.analytics.hours_cache import Runner
from metering.analytics.window import resolve
from metering.auth.deps import Reader
from metering.errors import ApiError, error_responses

router = APIRouter(prefix="/v1", tags=["figures"])
T = TypeVar("T")

WindowQ = Annotated[
    Literal["24h", "7d", "30d", "90d"] | None,
    Query(description="24h, 7d, 30d or 90d (default 30d, ending now); not with from/to"),
]
FromQ = Annotated[
    str | None,
    Query(
        alias="from",
        max_length=64,
        json_schema_extra={"format": "date-time"},
        description="RFC 3339 with an offset; window start, before `to`",
    ),
]
ToQ = Annotated[
    str | None,
    Query(
        alias="to",
        max_length=64,
        json_schema_extra={"format": "date-time"},
        description="RFC 3339 with an offset; window end (excluded); default now",
    ),
]
TenantQ = Annotated[
    str | None,
    Query(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$", description="admin only: one tenant"),
]
NameQ = Annotated[str | None, Query(min_length=1, max_length=128)]
_READ_ERRORS = error_responses(400, 401, 403, 503)


@router.get("/stats", responses=_READ_ERRORS)
async def get_stats(
    state: AnalyticsStateDep,
    principal: Reader,
    window: WindowQ = None,
    start: FromQ = None,
    end: ToQ = None,
    tenant_id: TenantQ = None,
) -> dict[str, Any]:
    """The 30-day figures of the seed page (or any window), for the platform or one tenant."""
    span = resolve(window, start, end)
    tenant = principal.tenant_scope(tenant_id)
    await fresh(state)
    book = state.prices.get()
    if tenant is None:  # whole hours from the proved cache, edges live
        figures = await run_in_threadpool(state.hours.platform, _parallel(state), book, span)
        return service.assemble_stats(
            book, span, None, figures.facts, figures.accounts, figures.probes
        )
    # Two independent queries at once, each on a read client of its own.
    rows, probes = await asyncio.gather(
        _read(state, lambda ch: service.stats_facts(ch, book, span, tenant)),
        _read(state, lambda ch: probe_counts(ch, span)),
    )
    return service.assemble_stats(book, span, tenant, rows, None, probes)


_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="figures")


def _parallel(state: AnalyticsState) -> Runner:
    """Run reads at once, each on a read client of its own (taken when it starts)."""

    def one(read: Callable[[Client], T]) -> T:
        with state.reads.client() as ch:
            return read(ch)

    def run(reads: Sequence[Callable[[Client], Any]]) -> list[Any]:
        return [f.result() for f in [_POOL.submit(one, read) for read in reads]]

    return run


async def _read(state: AnalyticsState, query: Callable[[Client], T]) -> T:
    def work() -> T:
        with state.reads.client() as ch:
            return query(ch)

    return await run_in_threadpool(work)


def _group_by(text: str | None) -> list[str]:
    if not text:
        return []
    keys = [k.strip() for k in text.split(",")]
    bad = [k for k in keys if k not in GROUP_KEYS]
    if bad:
        raise ApiError(400, f"group_by: unknown key {bad[0]!r}; use {', '.join(GROUP_KEYS)}")
    if len(set(keys)) != len(keys):
        raise ApiError(400, "group_by: a key is repeated")
    return keys


@router.get("/usage", responses=_READ_ERRORS)
async def get_usage(
    state: AnalyticsStateDep,
    principal: Reader,
    window: WindowQ = None,
    start: FromQ = None,
    end: ToQ = None,
    granularity: Annotated[str, Query(pattern=r"^(hour|day|month)$")] = "day",
    group_by: Annotated[
        str | None, Query(max_length=200, description="comma-separated: " + ",".join(GROUP_KEYS))
    ] = None,
    tenant_id: TenantQ = None,
    project_id: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")] = None,
    provider: NameQ = None,
    model: NameQ = None,
) -> dict[str, Any]:
    """Usage and cost per bucket and group; cost_usd is null where usage has no price."""
    span = resolve(window, start, end)
    keys = _group_by(group_by)
    tenant = principal.tenant_scope(tenant_id)
    filters = {
        k: v
        for k, v in (
            ("tenant_id", tenant),
            ("project_id", project_id),
            ("provider", provider),
            ("model", model),
        )
        if v is not None
    }
    await fresh(state)
    book = state.prices.get()
    return await run_in_threadpool(
        lambda: service.usage(
            _parallel(state),
            book,
            span,
            granularity=granularity,
            group_by=keys,
            filters=filters,
            hours=state.hours,
        )
    )


@router.get("/providers", responses=_READ_ERRORS)
async def get_providers(
    state: AnalyticsStateDep,
    principal: Reader,
    window: WindowQ = None,
    start: FromQ = None,
    end: ToQ = None,
    tenant_id: TenantQ = None,
) -> dict[str, Any]:
    """The provider comparison table: requests, errors, latency, peak rps, uptime, prices."""
    span = resolve(window, start, end)
    tenant = principal.tenant_scope(tenant_id)
    await fresh(state)
    book = state.prices.get()
    now = datetime.now(UTC)

    return await _read(state, lambda ch: service.providers(ch, book, span, tenant, now))
