"""What the dashboard shows, read with the same functions as the API (so the cards equal
`/v1/stats` exactly), each query on a read client of its own, all at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from clickhouse_connect.driver.client import Client
from starlette.concurrency import run_in_threadpool

from billing.rating import PriceBook
from metering.analytics import requests as log
from metering.analytics import service
from metering.analytics.deps import AnalyticsState
from metering.analytics.facts import ms
from metering.analytics.incidents import Incident, read_incidents
from metering.analytics.window import Window

T = TypeVar("T")

WINDOWS = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
LOG_PAGE = 20

_UPTIME = (
    "SELECT toStartOf{unit}(timestamp) AS t, countIf(ok) AS ok, count() AS n"
    " FROM uptime_probes"
    " WHERE timestamp >= {{start:DateTime64(3, 'UTC')}} AND timestamp < {{end:DateTime64(3, 'UTC')}}"
    " GROUP BY t ORDER BY t"
)


def window_of(name: str, now: datetime | None = None) -> Window:
    end = (now or datetime.now(UTC)).replace(microsecond=0)
    return Window(end - WINDOWS[name], end)


def granularity_of(window: Window) -> str:
    return "hour" if window.span <= timedelta(days=2) else "day"


def uptime_series(ch: Client, window: Window, granularity: str) -> list[tuple[datetime, float]]:
    unit = "Hour" if granularity == "hour" else "Day"
    rows = ch.query(
        _UPTIME.format(unit=unit), parameters={"start": ms(window.start), "end": ms(window.end)}
    ).result_rows
    out = []
    for t, ok, n in rows:
        when = t.replace(tzinfo=UTC) if t.tzinfo is None else t
        out.append((when, 100.0 * int(ok) / int(n)))
    return out


async def read(state: AnalyticsState, query: Callable[[Client], T]) -> T:
    def run() -> T:
        with state.reads.client() as client:
            return query(client)

    return await run_in_threadpool(run)


def start_all(
    state: AnalyticsState,
    book: PriceBook,
    window: Window,
    tenant: str | None,
    filters: log.Filters,
    cursor: log.Cursor | None,
    digest: str,
) -> dict[str, asyncio.Task[Any]]:
    """Every query of the page, started at once; the page awaits each where it is shown."""
    previous = Window(window.start - window.span, window.start)
    granularity = granularity_of(window)
    log_window = window
    if cursor is not None:
        log_window = Window(log.from_ms(cursor.from_ms), log.from_ms(cursor.to_ms))
    jobs: dict[str, Callable[[Client], Any]] = {
        "stats": lambda ch: service.stats(ch, book, window, tenant, state.hours),
        "previous": lambda ch: service.stats(ch, book, previous, tenant, state.hours),
        "usage": lambda ch: service.usage(
            ch,
            book,
            window,
            granularity=granularity,
            group_by=[],
            filters={"tenant_id": tenant} if tenant else {},
            hours=state.hours,
        ),
        "providers": lambda ch: service.providers(ch, book, window, tenant, datetime.now(UTC)),
        "uptime": lambda ch: (
            uptime_series(ch, window, granularity),
            [i for i in read_incidents(ch, window) if isinstance(i, Incident)],
        ),
        "requests": lambda ch: log.read_page(
            ch, filters, log_window, LOG_PAGE, digest, cursor, state.hours
        ),
    }
    return {name: asyncio.ensure_future(read(state, job)) for name, job in jobs.items()}
