"""Usage facts from ClickHouse: aggregated rows that rating and the figures are built on.

A window is read in pieces, each from the cheapest exact source:
- whole UTC hours from a projection, except hours in which a price takes effect off
  the hour: platform-wide from `p_hourly` (hundreds of rows for a month), with a tenant
  filter or a tenant or project grouping from `p_tenant_hourly` (keyed by tenant first,
  so one tenant's hours are a few granules); ClickHouse picks the one that reads least;
- the rest (the partial hours at the window's edges, and those split hours) from the
  raw rows, each row's span starting at the later of its hour and the last price
  boundary before it, so that one price applies to every span.

Distinct accounts come from Roaring bitmaps of dense tenant numbers: whole days from
`p_daily_tenants`, whole hours from `p_hourly`, the edges from raw rows; bitmaps union
exactly. Every branch's SQL is a constant or built here from allow-listed names; values
are bound as parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
from clickhouse_connect.driver.client import Client

from metering.analytics.window import Window, ceil_day, ceil_hour, floor_day, floor_hour

_T64 = "DateTime64(3, 'UTC')"
GROUP_KEYS = ("tenant_id", "project_id", "provider", "model")
# No alias may shadow a column: `sum(x) AS x` would turn a later `sum(... x)` into an
# aggregate of an aggregate.
_SUMS = (
    "count() AS n_requests, sum(documents) AS n_documents,"
    " sum(toUInt128(queries) * documents) AS n_pairs,"
    " sum(toUInt128(input_tokens)) AS n_input,"
    " sum(toUInt128(output_tokens)) AS n_output"
)
_FILTERS = {
    "tenant_id": "tenant_id = {tenant_id:String}",
    "project_id": "project_id = {project_id:String}",
    "provider": "provider = {provider:String}",
    "model": "model = {model:String}",
}


@dataclass(frozen=True, slots=True)
class Fact:
    """Aggregated events of one span (one price applies), provider, model and status."""

    span: datetime
    provider: str
    model: str
    status: str
    keys: tuple[str, ...]  # values of the extra group keys (tenant_id, project_id)
    requests: int
    documents: int
    pairs: int
    input_tokens: int
    output_tokens: int


def ms(t: datetime) -> str:
    """A DateTime64(3) parameter: clickhouse-connect would drop the milliseconds."""
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _where(filters: dict[str, str]) -> str:
    return "".join(f" AND {_FILTERS[name]}" for name in filters)


def _ranges(ranges: Sequence[tuple[datetime, datetime]], params: dict[str, object]) -> str:
    parts = []
    for i, (a, b) in enumerate(ranges):
        params[f"a{i}"], params[f"b{i}"] = ms(a), ms(b)
        parts.append(f"(timestamp >= {{a{i}:{_T64}}} AND timestamp < {{b{i}:{_T64}}})")
    return "(" + " OR ".join(parts) + ")"


def _hour_range(params: dict[str, object], start: datetime, end: datetime, name: str) -> str:
    params[f"{name}_from"], params[f"{name}_to"] = start, end
    return (
        f"toStartOfHour(timestamp) >= {{{name}_from:DateTime('UTC')}}"
        f" AND toStartOfHour(timestamp) < {{{name}_to:DateTime('UTC')}}"
    )


@dataclass(frozen=True)
class Plan:
    """Which part of a window each source reads."""

    hours: tuple[datetime, datetime] | None  # whole hours from the projection
    split_hours: list[datetime]  # ... except these (read raw)
    raw: list[tuple[datetime, datetime]]  # raw ranges


def plan(window: Window, boundaries: Sequence[datetime]) -> Plan:
    start, end = window.start, window.end
    h1, h2 = ceil_hour(start), floor_hour(end)
    if h1 >= h2:
        return Plan(None, [], [(start, end)])
    raw = []
    if start < h1:
        raw.append((start, h1))
    if h2 < end:
        raw.append((h2, end))
    split = sorted({floor_hour(b) for b in boundaries if b != floor_hour(b) and h1 <= b < h2})
    raw.extend((h, h + timedelta(hours=1)) for h in split)
    return Plan((h1, h2), split, raw)


_BUCKETS = {
    "hour": "toDateTime64(toStartOfHour({t}), 3, 'UTC')",
    "day": "toDateTime64(toStartOfDay({t}), 3, 'UTC')",
    "month": "toDateTime64(toStartOfMonth({t}), 3, 'UTC')",
    None: "{origin:DateTime64(3, 'UTC')}",
}


def _span(t: str, bucket: str | None, bounded: bool) -> str:
    """The start of a row's rating span: the later of its bucket's start (the window's
    first hour without buckets) and the last price boundary at or before `t`. Every
    price entry of the window is a boundary, so one price covers each span. Without a
    boundary in the window the bucket's start is the span (no per-row array search)."""
    start = _BUCKETS[bucket].replace("{t}", t)
    if not bounded:
        return start
    return f"greatest({start}, arrayLast(b -> b <= {t}, {{bounds:Array({_T64})}}))"


@dataclass(frozen=True)
class FactQueries:
    """A window's facts as two SELECTs (either may be absent): whole hours from a
    projection, and raw rows (the edges and the hours a price change splits)."""

    hours: str | None
    hours_params: dict[str, object]
    hours_end: datetime | None  # the whole hours end here (None: no whole hours)
    raw: str | None
    raw_params: dict[str, object]
    keys: int  # extra group key columns (tenant_id, project_id) after status


def fact_queries(
    window: Window,
    boundaries: Sequence[datetime],
    *,
    filters: dict[str, str],
    group: Sequence[str] = (),
    bucket: str | None = "hour",
) -> FactQueries:
    extra = [k for k in group if k in ("tenant_id", "project_id")]
    p = plan(window, boundaries)
    common: dict[str, object] = dict(filters)
    common["bounds"] = [ms(b) for b in boundaries]
    common["origin"] = ms(floor_hour(window.start))
    key_cols = "".join(f", {k}" for k in extra)
    hours_sql = raw_sql = None
    hours_params, raw_params = dict(common), dict(common)
    if p.hours is not None:
        # Every expression is of toStartOfHour(timestamp), the projection's key.
        hours_params["split"] = p.split_hours
        hours_sql = (
            f"SELECT {_span('toStartOfHour(timestamp)', bucket, bool(boundaries))} AS span,"
            f" provider, model, status{key_cols}, {_SUMS} FROM rerank_events WHERE "
            + _hour_range(hours_params, p.hours[0], p.hours[1], "h")
            + " AND NOT has({split:Array(DateTime('UTC'))}, toStartOfHour(timestamp))"
            + _where(filters)
            + f" GROUP BY span, provider, model, status{key_cols}"
        )
    if p.raw:
        raw_sql = (
            f"SELECT {_span('timestamp', bucket, bool(boundaries))} AS span,"
            f" provider, model, status{key_cols}, {_SUMS} FROM rerank_events WHERE "
            + _ranges(p.raw, raw_params)
            + _where(filters)
            + f" GROUP BY span, provider, model, status{key_cols}"
        )
    hours_end = p.hours[1] if p.hours is not None else None
    return FactQueries(hours_sql, hours_params, hours_end, raw_sql, raw_params, len(extra))


def read_facts(
    ch: Client,
    sql: str,
    params: dict[str, object],
    keys: int,
    settings: dict[str, object] | None = None,
) -> list[Fact]:
    n = 4 + keys
    return [
        Fact(_utc(row[0]), row[1], row[2], row[3], tuple(row[4:n]), *map(int, row[n : n + 5]))
        for row in ch.query(sql, parameters=params, settings=settings or {}).result_rows
    ]


def facts(
    ch: Client,
    window: Window,
    boundaries: Sequence[datetime],
    *,
    filters: dict[str, str],
    group: Sequence[str] = (),
    bucket: str | None = "hour",
    settings: dict[str, object] | None = None,
) -> list[Fact]:
    """Aggregated usage of the window per time bucket (hour, day, month, or the whole
    window with None), split where a price takes effect, so one price covers each."""
    q = fact_queries(window, boundaries, filters=filters, group=group, bucket=bucket)
    selects = [sql for sql in (q.hours, q.raw) if sql is not None]
    if not selects:
        return []
    # One query: planning, not reading, is most of a small read's cost.
    return read_facts(
        ch, " UNION ALL ".join(selects), {**q.hours_params, **q.raw_params}, q.keys, settings
    )


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


EVENTS_AFTER = (
    "SELECT count() FROM rerank_events"
    f" WHERE timestamp >= {{end:{_T64}}} AND timestamp < {{day_end:{_T64}}}"
)


def _bitmap_branches(ch: Client, window: Window, params: dict[str, object]) -> list[str]:
    """SELECTs of `groupBitmapState(tenant_num) AS s` whose union is the window's tenants.

    Whole days come from the daily bitmaps, other whole hours from the hourly ones, the
    partial hours at the edges from raw rows (read in time order from p_by_time). The
    last day is whole too when nothing is stored after the window's end on that day
    (the usual case for a window ending now; an event may be up to 5 minutes ahead):
    then its daily bitmap holds exactly the tenants of [its midnight, end)."""
    start, end = window.start, window.end
    d1, d2 = ceil_day(start), floor_day(end)
    h1, h2 = ceil_hour(start), floor_hour(end)
    days: tuple[datetime, datetime] | None = None
    hour_ranges: list[tuple[datetime, datetime]] = []
    raw: list[tuple[datetime, datetime]] = []
    if h1 >= h2:
        raw = [(start, end)]
    else:
        if d1 <= d2:
            days = (d1, d2)
            hour_ranges = [(h1, d1), (d2, h2)]
        else:
            hour_ranges = [(h1, h2)]
        raw = [(start, h1), (h2, end)]
        if start <= d2 < end and d1 <= d2:
            day_end = d2 + timedelta(days=1)
            after = ch.query(
                EVENTS_AFTER, parameters={"end": ms(end), "day_end": ms(day_end)}
            ).result_rows[0][0]
            if not int(after):
                days = (d1, day_end)
                hour_ranges = [(h1, d1)]
                raw = [(start, h1)]
    branches = []
    if days is not None and days[0] < days[1]:
        params["d1"], params["d2"] = days[0].date(), days[1].date()
        branches.append(
            "SELECT groupBitmapState(tenant_num) AS s FROM rerank_events"
            " WHERE toDate(timestamp) >= {d1:Date} AND toDate(timestamp) < {d2:Date}"
        )
    for i, (a, b) in enumerate(r for r in hour_ranges if r[0] < r[1]):
        branches.append(
            "SELECT groupBitmapState(tenant_num) AS s FROM rerank_events WHERE "
            + _hour_range(params, a, b, f"h{i}")
        )
    raw = [r for r in raw if r[0] < r[1]]
    if raw:
        branches.append(
            "SELECT groupBitmapState(tenant_num) AS s FROM rerank_events WHERE "
            + _ranges(raw, params)
        )
    return branches


def active_accounts(ch: Client, window: Window, settings: dict[str, object] | None = None) -> int:
    """Distinct tenants with an event in the window, exactly (bitmap union)."""
    params: dict[str, object] = {}
    branches = _bitmap_branches(ch, window, params)
    if not branches:
        return 0
    sql = "SELECT groupBitmapOr(s) FROM (" + " UNION ALL ".join(branches) + ")"
    return int(ch.query(sql, parameters=params, settings=settings or {}).result_rows[0][0])


def tenant_numbers(ch: Client, window: Window) -> npt.NDArray[np.uint32]:
    """The dense numbers of the tenants with an event in the window (as active_accounts
    counts them), ascending (sorted here: a small bitmap keeps insertion order)."""
    params: dict[str, object] = {}
    branches = _bitmap_branches(ch, window, params)
    if not branches:
        return np.array([], np.uint32)
    sql = "SELECT bitmapToArray(groupBitmapOrState(s)) FROM (" + " UNION ALL ".join(branches) + ")"
    return np.sort(np.array(ch.query(sql, parameters=params).result_rows[0][0], np.uint32))


def edge_facts(
    ch: Client,
    ranges: Sequence[tuple[datetime, datetime]],
    boundaries: Sequence[datetime],
    origin: datetime,
) -> tuple[list[Fact], set[int]]:
    """Platform facts of raw time ranges for the whole window (bucket None, `origin` the
    window's first hour), and the numbers of the tenants with an event in them, in one
    query."""
    params: dict[str, object] = {"bounds": [ms(b) for b in boundaries], "origin": ms(origin)}
    sql = (
        f"SELECT {_span('timestamp', None, bool(boundaries))} AS span,"
        f" provider, model, status, {_SUMS}, groupUniqArray(tenant_num) FROM rerank_events"
        f" WHERE {_ranges(ranges, params)} GROUP BY span, provider, model, status"
    )
    out: list[Fact] = []
    tenants: set[int] = set()
    for row in ch.query(sql, parameters=params).result_rows:
        out.append(Fact(_utc(row[0]), row[1], row[2], row[3], (), *map(int, row[4:9])))
        tenants.update(row[9])
    return out, tenants


PROBE_COUNTS = (
    "SELECT provider, countIf(ok) AS ok, count() AS probes FROM uptime_probes"
    " WHERE timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}"
    " GROUP BY provider"
)


def probe_counts(ch: Client, window: Window) -> dict[str, tuple[int, int]]:
    """(ok probes, probes) per provider in the window."""
    rows = ch.query(PROBE_COUNTS, parameters={"start": window.start, "end": window.end}).result_rows
    return {provider: (int(ok), int(n)) for provider, ok, n in rows}


def probe_counts_in(
    ch: Client, ranges: Sequence[tuple[datetime, datetime]]
) -> dict[str, tuple[int, int]]:
    """(ok probes, probes) per provider in the time ranges."""
    params: dict[str, object] = {}
    sql = (
        "SELECT provider, countIf(ok), count() FROM uptime_probes WHERE "
        + _ranges(ranges, params)
        + " GROUP BY provider"
    )
    rows = ch.query(sql, parameters=params).result_rows
    return {provider: (int(ok), int(n)) for provider, ok, n in rows}
