"""Providers: latency, errors, traffic, uptime and fallbacks per provider: the seed
page's comparison table, from data, and its figures over time."""

from __future__ import annotations

from metering.dashboards.spec import (
    BUCKET,
    EDGES,
    FALLBACKS,
    HOUR_BUCKET,
    SERIES,
    SERIES_HOURS,
    WHOLE_HOURS,
    WINDOW,
    Board,
    Panel,
    base_attempts,
    base_cte,
)

REQUESTS_BY_PROVIDER = f"""{base_cte(SERIES_HOURS)}
SELECT {HOUR_BUCKET} AS time, p AS provider, sum(n) AS requests
FROM (
  {base_attempts("hour, ")}
)
GROUP BY time, provider
ORDER BY time, provider"""

ERROR_RATE_BY_PROVIDER = f"""{base_cte(SERIES_HOURS)}
SELECT {HOUR_BUCKET} AS time, p AS provider, 100 * sum(e) / sum(n) AS error_rate_pct
FROM (
  {base_attempts("hour, ")}
)
GROUP BY time, provider
ORDER BY time, provider"""

# Over ok requests; DDSketch states merged (1% relative error), as the service's.
LATENCY_BY_PROVIDER = f"""SELECT time, provider, qs[1] AS p50_ms, qs[2] AS p95_ms, qs[3] AS p99_ms
FROM (
  SELECT {HOUR_BUCKET} AS time, p AS provider,
    quantilesDDMerge(0.01, 0.5, 0.95, 0.99)(q) AS qs
  FROM (
    SELECT toStartOfHour(timestamp) AS hour, provider AS p,
      quantilesDDState(0.01, 0.5, 0.95, 0.99)(latency_ms) AS q
    FROM rerank_events WHERE {SERIES_HOURS} AND status = 'ok'
    GROUP BY hour, p
  )
  GROUP BY time, provider
)
ORDER BY time, provider"""

# Probes are few (one per provider every 30 s): read as rows.
UPTIME_BY_PROVIDER = f"""SELECT {BUCKET} AS time, provider,
  100 * countIf(ok) / count() AS uptime_pct
FROM uptime_probes
WHERE {SERIES}
GROUP BY time, provider
ORDER BY time, provider"""

FAILED_FALLBACKS = f"""SELECT {HOUR_BUCKET} AS time, k AS provider_tried, sum(v) AS failed_attempts
FROM (
  SELECT toStartOfHour(timestamp) AS hour, {FALLBACKS} AS fb
  FROM rerank_events WHERE {SERIES_HOURS}
  GROUP BY hour
)
ARRAY JOIN tupleElement(fb, 1) AS k, tupleElement(fb, 2) AS v
GROUP BY time, provider_tried
ORDER BY time, provider_tried"""

# The comparison table of `GET /v1/providers` for [from, to), exactly (percentiles
# within 1%): whole hours from p_hourly, the edges from rows. peak_rps is left to the
# service: a per-second peak is no rollup, and over a month it is a scan of every event.
COMPARISON = f"""{base_cte(WHOLE_HOURS, EDGES, hourly=False)}
SELECT a.provider AS provider, a.requests AS requests, a.errors AS errors,
  100 * a.errors / a.requests AS error_rate_pct,
  l.avg_ms AS latency_avg_ms, l.qs[1] AS latency_p50_ms, l.qs[2] AS latency_p95_ms,
  l.qs[3] AS latency_p99_ms, u.uptime_pct AS uptime_pct
FROM (
  SELECT p AS provider, sum(n) AS requests, sum(e) AS errors
  FROM (
  {base_attempts()}
  )
  GROUP BY provider
) AS a
LEFT JOIN (
  SELECT p AS provider, sum(lat) / sum(c) AS avg_ms,
    quantilesDDMerge(0.01, 0.5, 0.95, 0.99)(q) AS qs
  FROM base
  WHERE status = 'ok'
  GROUP BY provider
) AS l ON l.provider = a.provider
LEFT JOIN (
  SELECT provider, 100 * countIf(ok) / count() AS uptime_pct
  FROM uptime_probes
  WHERE {WINDOW}
  GROUP BY provider
) AS u ON u.provider = a.provider
ORDER BY requests DESC, provider
SETTINGS join_use_nulls = 1"""

BOARD = Board(
    uid="rerank-providers",
    title="Rerank metering: providers",
    description="Latency, errors, traffic, uptime and fallbacks per provider. A failed "
    "fallback attempt counts as a request and an error of the provider it tried.",
    panels=(
        Panel(
            "Provider comparison",
            "table",
            COMPARISON,
            (
                "provider",
                "requests",
                "errors",
                "error_rate_pct",
                "latency_avg_ms",
                "latency_p50_ms",
                "latency_p95_ms",
                "latency_p99_ms",
                "uptime_pct",
            ),
            width=24,
            height=7,
            description="As GET /v1/providers for the time range [from, to): latency over "
            "ok requests (percentiles within 1%). Peak requests per second: see the service.",
            rollup=True,
        ),
        Panel(
            "Latency percentiles by provider",
            "timeseries",
            LATENCY_BY_PROVIDER,
            ("time", "provider", "p50_ms", "p95_ms", "p99_ms"),
            labels=("provider",),
            unit="ms",
            rollup=True,
        ),
        Panel(
            "Error rate by provider",
            "timeseries",
            ERROR_RATE_BY_PROVIDER,
            ("time", "provider", "error_rate_pct"),
            labels=("provider",),
            unit="percent",
            rollup=True,
        ),
        Panel(
            "Requests by provider",
            "timeseries",
            REQUESTS_BY_PROVIDER,
            ("time", "provider", "requests"),
            labels=("provider",),
            rollup=True,
        ),
        Panel(
            "Uptime by provider (probes)",
            "timeseries",
            UPTIME_BY_PROVIDER,
            ("time", "provider", "uptime_pct"),
            labels=("provider",),
            unit="percent",
        ),
        Panel(
            "Failed fallback attempts by provider tried",
            "bars",
            FAILED_FALLBACKS,
            ("time", "provider_tried", "failed_attempts"),
            labels=("provider_tried",),
            rollup=True,
        ),
    ),
)
