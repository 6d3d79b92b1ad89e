"""Overview: the seed page's four 30-day figures (as `GET /v1/stats` defines them) and
traffic over time."""

from __future__ import annotations

from metering.dashboards.spec import (
    EDGES,
    HOUR_BUCKET,
    SERIES_HOURS,
    WHOLE_HOURS,
    WINDOW,
    Board,
    Panel,
)

DOCUMENTS_RERANKED = f"""SELECT sum(n) AS documents_reranked
FROM (
  SELECT sum(documents) AS n FROM rerank_events WHERE {WHOLE_HOURS} AND status = 'ok'
  UNION ALL
  SELECT sum(documents) AS n FROM rerank_events WHERE {EDGES} AND status = 'ok'
)"""

REQUESTS = f"""SELECT sum(n) AS requests
FROM (
  SELECT count() AS n FROM rerank_events WHERE {WHOLE_HOURS}
  UNION ALL
  SELECT count() AS n FROM rerank_events WHERE {EDGES}
)"""

# Exact, as the service counts them: the union of Roaring bitmaps of dense tenant
# numbers (whole hours from p_hourly_tenants, the edges from rows). Never uniq's estimate.
ACTIVE_ACCOUNTS = f"""SELECT groupBitmapOr(s) AS active_accounts
FROM (
  SELECT groupBitmapState(tenant_num) AS s FROM rerank_events WHERE {WHOLE_HOURS}
  UNION ALL
  SELECT groupBitmapState(tenant_num) AS s FROM rerank_events WHERE {EDGES}
)"""

# NULL without probes, like the service's null. Probes are few: read as rows.
AVG_UPTIME = f"""SELECT if(count() = 0, NULL, 100 * countIf(ok) / count()) AS avg_uptime_pct
FROM uptime_probes
WHERE {WINDOW}"""

REQUESTS_SERIES = f"""SELECT {HOUR_BUCKET} AS time, sum(c) AS requests
FROM (
  SELECT toStartOfHour(timestamp) AS hour, count() AS c
  FROM rerank_events WHERE {SERIES_HOURS}
  GROUP BY hour
)
GROUP BY time
ORDER BY time"""

DOCUMENTS_SERIES = f"""SELECT {HOUR_BUCKET} AS time, sum(d) AS documents_reranked
FROM (
  SELECT toStartOfHour(timestamp) AS hour, sum(documents) AS d
  FROM rerank_events WHERE {SERIES_HOURS} AND status = 'ok'
  GROUP BY hour
)
GROUP BY time
ORDER BY time"""

ERROR_RATE_SERIES = f"""SELECT {HOUR_BUCKET} AS time,
  100 * sumIf(c, status = 'error') / sum(c) AS error_rate_pct
FROM (
  SELECT toStartOfHour(timestamp) AS hour, status, count() AS c
  FROM rerank_events WHERE {SERIES_HOURS}
  GROUP BY hour, status
)
GROUP BY time
ORDER BY time"""

# The daily bitmaps (p_daily_tenants) of every UTC day the range touches.
ACTIVE_ACCOUNTS_DAILY = """SELECT toDateTime(day, 'UTC') AS time,
  bitmapCardinality(s) AS active_accounts
FROM (
  SELECT toDate(timestamp) AS day, groupBitmapState(tenant_num) AS s
  FROM rerank_events
  WHERE toDate(timestamp) >= toDate($__fromTime, 'UTC')
    AND toDate(timestamp) <= toDate($__toTime, 'UTC')
  GROUP BY day
)
ORDER BY time"""

BOARD = Board(
    uid="rerank-overview",
    title="Rerank metering: overview",
    description="The platform's figures: documents reranked, requests, active developer "
    "accounts, uptime, and traffic over time (hourly or coarser, from the service's rollups).",
    panels=(
        Panel(
            "Documents reranked",
            "stat",
            DOCUMENTS_RERANKED,
            ("documents_reranked",),
            width=6,
            height=4,
            description="Σ documents of ok events in the time range ([from, to)).",
            rollup=True,
        ),
        Panel(
            "API requests",
            "stat",
            REQUESTS,
            ("requests",),
            width=6,
            height=4,
            description="Events in the time range, ok and error.",
            rollup=True,
        ),
        Panel(
            "Active developer accounts",
            "stat",
            ACTIVE_ACCOUNTS,
            ("active_accounts",),
            width=6,
            height=4,
            description="Distinct tenants with at least one event (exact).",
            rollup=True,
        ),
        Panel(
            "Average uptime",
            "stat",
            AVG_UPTIME,
            ("avg_uptime_pct",),
            unit="percent",
            width=6,
            height=4,
            description="100 x ok probes / probes, all providers.",
        ),
        Panel("Requests", "timeseries", REQUESTS_SERIES, ("time", "requests"), rollup=True),
        Panel(
            "Documents reranked",
            "timeseries",
            DOCUMENTS_SERIES,
            ("time", "documents_reranked"),
            rollup=True,
        ),
        Panel(
            "Error rate",
            "timeseries",
            ERROR_RATE_SERIES,
            ("time", "error_rate_pct"),
            unit="percent",
            description="Events with status error / events, per interval.",
            rollup=True,
        ),
        Panel(
            "Active developer accounts per day",
            "bars",
            ACTIVE_ACCOUNTS_DAILY,
            ("time", "active_accounts"),
            description="Distinct tenants per UTC day (exact).",
            rollup=True,
        ),
    ),
)
