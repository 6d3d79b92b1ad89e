"""The providers table (`GET /v1/providers`): the seed page's comparison, from data.

A request counts for the provider that served it; each failed fallback attempt counts
as a request and an error of the provider it tried. Latency figures are over `ok`
requests: the average exactly, percentiles from DDSketch states (relative error <= 1%).
`peak_rps` is the most requests (fallback attempts included) a provider got in one UTC
second. Whole hours and seconds are read from projections, the window's edges and any
tenant-scoped read from raw rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

from metering.analytics.facts import _hour_range, _ranges
from metering.analytics.window import Window, ceil_hour, floor_hour

log = logging.getLogger(__name__)

_FALLBACKS = (
    "sumMap(tupleElement(fallbacks, 'provider'), arrayWithConstant(length(fallbacks), toUInt64(1)))"
)
_LATENCY = (
    "SELECT provider, status, count() AS c, sum(latency_ms) AS lat,"
    " quantilesDDState(0.01, 0.5, 0.95, 0.99)(latency_ms) AS q, "
    + _FALLBACKS
    + " AS fb FROM rerank_events WHERE {where} GROUP BY provider, status"
)


@dataclass
class ProviderFigures:
    provider: str
    requests: int = 0
    errors: int = 0
    ok_requests: int = 0
    latency_sum: float = 0.0
    quantiles: list[float] = field(default_factory=list)
    peak_rps: int = 0


def _split(
    window: Window, tenant: bool, unit: str
) -> tuple[tuple[datetime, datetime] | None, list[tuple[datetime, datetime]]]:
    if tenant:
        return None, [(window.start, window.end)]
    a, b = ceil_hour(window.start), floor_hour(window.end)
    if a >= b:
        return None, [(window.start, window.end)]
    raw = [r for r in ((window.start, a), (b, window.end)) if r[0] < r[1]]
    return (a, b), raw


def provider_figures(
    ch: Client, window: Window, tenant_id: str | None, settings: dict[str, object] | None = None
) -> dict[str, ProviderFigures]:
    figures: dict[str, ProviderFigures] = {}
    tenant_filter = " AND tenant_id = {tenant_id:String}" if tenant_id else ""
    params: dict[str, object] = {"tenant_id": tenant_id} if tenant_id else {}
    whole, raw = _split(window, tenant_id is not None, "hour")
    branches = []
    if whole is not None:
        branches.append(
            _LATENCY.replace(
                "{where}", _hour_range(params, whole[0], whole[1], "h") + tenant_filter
            )
        )
    if raw:
        branches.append(_LATENCY.replace("{where}", _ranges(raw, params) + tenant_filter))
    sql = (
        "SELECT provider, status, sum(c), sum(lat), quantilesDDMerge(0.01, 0.5, 0.95, 0.99)(q),"
        " sumMap(fb) FROM (" + " UNION ALL ".join(branches) + ") GROUP BY provider, status"
    )
    for provider, status, count, lat, quantiles, (keys, values) in ch.query(
        sql, parameters=params, settings=settings or {}
    ).result_rows:
        f = figures.setdefault(provider, ProviderFigures(provider))
        f.requests += int(count)
        if status == "error":
            f.errors += int(count)
        else:
            f.ok_requests += int(count)
            f.latency_sum += float(lat)
            f.quantiles = [float(q) for q in quantiles]
        for tried, attempts in zip(keys, values, strict=True):
            g = figures.setdefault(tried, ProviderFigures(tried))
            g.requests += int(attempts)
            g.errors += int(attempts)
    for provider, peak in peak_rps(ch, window, tenant_id, settings).items():
        figures.setdefault(provider, ProviderFigures(provider)).peak_rps = peak
    return figures


HOUR_COUNTS = (
    "SELECT hour, p, sum(c) FROM ("
    " SELECT toStartOfHour(timestamp) AS hour, provider AS p, count() AS c"
    " FROM rerank_events WHERE {where} GROUP BY hour, p"
    " UNION ALL"
    " SELECT hour, k AS p, v AS c FROM (SELECT toStartOfHour(timestamp) AS hour, "
    + _FALLBACKS
    + " AS m FROM rerank_events WHERE {where} GROUP BY hour)"
    " ARRAY JOIN tupleElement(m, 1) AS k, tupleElement(m, 2) AS v"
    ") GROUP BY hour, p"
)
CACHED_PEAKS = (
    "SELECT hour, provider, argMax(peak, requests), max(requests) FROM provider_peaks_hourly"
    " WHERE hour >= {h_from:DateTime('UTC')} AND hour < {h_to:DateTime('UTC')}"
    " GROUP BY hour, provider"
)
# Requests per second and provider (served, plus failed fallback attempts per provider
# tried), then per hour: the peak second and the hour's total.
PER_SECOND_PEAKS = (
    "SELECT toStartOfHour(s) AS hour, p, max(c), sum(c) FROM ("
    " SELECT s, p, sum(c) AS c FROM ("
    " SELECT toStartOfSecond(timestamp) AS s, provider AS p, count() AS c"
    " FROM rerank_events WHERE {where} GROUP BY s, p"
    " UNION ALL"
    " SELECT toStartOfSecond(timestamp) AS s, tupleElement(f, 'provider') AS p, count() AS c"
    " FROM rerank_events ARRAY JOIN fallbacks AS f WHERE {where} GROUP BY s, p"
    " ) GROUP BY s, p"
    ") GROUP BY hour, p"
)
Peaks = dict[tuple[datetime, str], tuple[int, int]]  # (hour, provider) -> (peak, requests)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _per_second(ch: Client, where: str, params: dict[str, object]) -> Peaks:
    sql = PER_SECOND_PEAKS.replace("{where}", where)
    rows = ch.query(sql, parameters=params).result_rows
    return {(_utc(h), p): (int(peak), int(n)) for h, p, peak, n in rows}


def peak_rps(
    ch: Client, window: Window, tenant_id: str | None, settings: dict[str, object] | None = None
) -> dict[str, int]:
    """The most requests per UTC second per provider, fallback attempts included.

    Whole hours: the cached peak of each (hour, provider) whose request count is still
    the one it was computed from; other hours are computed from raw rows and cached.
    The window's partial hours, and tenant-scoped reads, come from raw rows."""
    peaks: dict[str, int] = {}

    def take(found: Peaks) -> None:
        for (_, provider), (peak, _) in found.items():
            peaks[provider] = max(peaks.get(provider, 0), peak)

    params: dict[str, object] = {"tenant_id": tenant_id} if tenant_id else {}
    tenant_filter = " AND tenant_id = {tenant_id:String}" if tenant_id else ""
    whole, raw = _split(window, tenant_id is not None, "hour")
    if raw:
        take(_per_second(ch, _ranges(raw, params) + tenant_filter, params))
    if whole is None:
        return peaks
    where = _hour_range(params, whole[0], whole[1], "h")
    counts = {
        (_utc(h), p): int(n)
        for h, p, n in ch.query(
            HOUR_COUNTS.replace("{where}", where), parameters=params, settings=settings or {}
        ).result_rows
    }
    cached = {
        (_utc(h), p): (int(peak), int(n))
        for h, p, peak, n in ch.query(CACHED_PEAKS, parameters=params).result_rows
    }
    fresh = {k: v for k, v in cached.items() if counts.get(k) == v[1]}
    take(fresh)
    stale_hours = sorted({hour for hour, _ in counts.keys() - fresh.keys()})
    if stale_hours:
        stale_params: dict[str, object] = {
            "hours": [h.strftime("%Y-%m-%d %H:%M:%S") for h in stale_hours],
            "days": sorted({h.date() for h in stale_hours}),
        }
        computed = _per_second(
            ch,
            "toDate(timestamp) IN {days:Array(Date)}"
            " AND toStartOfHour(timestamp) IN {hours:Array(DateTime('UTC'))}",
            stale_params,
        )
        take(computed)
        _cache(ch, computed)
    return peaks


def _cache(ch: Client, computed: Peaks) -> None:
    """Keep computed peaks; a failure only costs the next read a recomputation."""
    rows = [[hour, p, n, peak] for (hour, p), (peak, n) in computed.items()]
    try:
        ch.insert(
            "provider_peaks_hourly", rows, column_names=["hour", "provider", "requests", "peak"]
        )
    except Exception as exc:  # a read-only user, ClickHouse busy: the answer stands
        log.warning("caching %d hourly peaks failed: %s", len(rows), exc)


def rows_sorted(figures: dict[str, ProviderFigures]) -> Sequence[ProviderFigures]:
    return sorted(figures.values(), key=lambda f: (-f.requests, f.provider))
