"""Tenant drill-down: one developer account's traffic, latency, errors and usage, picked
with the `tenant` variable (its most active tenants first; any id can be typed)."""

from __future__ import annotations

from metering.dashboards.spec import BUCKET, SERIES, TENANT, WINDOW, Board, Panel, Variable

# The 1,000 most active tenants of the time range: a seed month has ~210K, more than a
# drop-down can hold. Re-read when the time range changes.
TENANTS = f"""SELECT tenant_id
FROM rerank_events
WHERE {SERIES}
GROUP BY tenant_id
ORDER BY count() DESC, tenant_id
LIMIT 1000"""


def _stat(expression: str, name: str, extra: str = "") -> str:
    return f"""SELECT {expression} AS {name}
FROM rerank_events
WHERE {TENANT} AND {WINDOW}{extra}"""


REQUESTS = _stat("count()", "requests")
DOCUMENTS = _stat("sum(documents)", "documents_reranked", " AND status = 'ok'")
ERRORS = _stat("countIf(status = 'error')", "errors")
PAIRS = _stat("sum(toUInt64(queries) * documents)", "doc_query_pairs", " AND status = 'ok'")

REQUESTS_BY_PROJECT = f"""SELECT {BUCKET} AS time, project_id, count() AS requests
FROM rerank_events
WHERE {TENANT} AND {SERIES}
GROUP BY time, project_id
ORDER BY time, project_id"""

DOCUMENTS_SERIES = f"""SELECT {BUCKET} AS time,
  sumIf(documents, status = 'ok') AS documents_reranked
FROM rerank_events
WHERE {TENANT} AND {SERIES}
GROUP BY time
ORDER BY time"""

LATENCY_BY_PROVIDER = f"""SELECT time, provider, q[1] AS p50_ms, q[2] AS p95_ms, q[3] AS p99_ms
FROM (
  SELECT {BUCKET} AS time, provider, quantilesDD(0.01, 0.5, 0.95, 0.99)(latency_ms) AS q
  FROM rerank_events
  WHERE {TENANT} AND {SERIES} AND status = 'ok'
  GROUP BY time, provider
)
ORDER BY time, provider"""

ERROR_RATE = f"""SELECT {BUCKET} AS time,
  100 * countIf(status = 'error') / count() AS error_rate_pct
FROM rerank_events
WHERE {TENANT} AND {SERIES}
GROUP BY time
ORDER BY time"""

USAGE = f"""SELECT project_id, provider, model, count() AS requests,
  countIf(status = 'error') AS errors,
  sumIf(documents, status = 'ok') AS documents_reranked,
  sumIf(toUInt64(queries) * documents, status = 'ok') AS doc_query_pairs,
  sumIf(input_tokens, status = 'ok') AS input_tokens_sum,
  sumIf(output_tokens, status = 'ok') AS output_tokens_sum
FROM rerank_events
WHERE {TENANT} AND {WINDOW}
GROUP BY project_id, provider, model
ORDER BY project_id, provider, model"""

LATEST = f"""SELECT timestamp, event_id, project_id, provider, model, status, http_status,
  error_type, documents, latency_ms, length(fallbacks) AS fallbacks_tried
FROM rerank_events
WHERE {TENANT} AND {SERIES}
ORDER BY timestamp DESC, event_id DESC
LIMIT 100"""

BOARD = Board(
    uid="rerank-tenant",
    title="Rerank metering: tenant drill-down",
    description="One developer account: traffic per project, latency and errors per "
    "provider, billable usage and its latest requests.",
    variables=(Variable("tenant", "Tenant", TENANTS, ("tenant_id",)),),
    panels=(
        Panel("Requests", "stat", REQUESTS, ("requests",), width=6, height=4),
        Panel(
            "Documents reranked",
            "stat",
            DOCUMENTS,
            ("documents_reranked",),
            width=6,
            height=4,
        ),
        Panel("Errors", "stat", ERRORS, ("errors",), width=6, height=4),
        Panel("Doc-query pairs", "stat", PAIRS, ("doc_query_pairs",), width=6, height=4),
        Panel(
            "Requests by project",
            "timeseries",
            REQUESTS_BY_PROJECT,
            ("time", "project_id", "requests"),
            labels=("project_id",),
        ),
        Panel(
            "Documents reranked",
            "timeseries",
            DOCUMENTS_SERIES,
            ("time", "documents_reranked"),
        ),
        Panel(
            "Latency percentiles by provider",
            "timeseries",
            LATENCY_BY_PROVIDER,
            ("time", "provider", "p50_ms", "p95_ms", "p99_ms"),
            labels=("provider",),
            unit="ms",
        ),
        Panel(
            "Error rate",
            "timeseries",
            ERROR_RATE,
            ("time", "error_rate_pct"),
            unit="percent",
        ),
        Panel(
            "Usage by project, provider and model",
            "table",
            USAGE,
            (
                "project_id",
                "provider",
                "model",
                "requests",
                "errors",
                "documents_reranked",
                "doc_query_pairs",
                "input_tokens_sum",
                "output_tokens_sum",
            ),
            width=24,
        ),
        Panel(
            "Latest requests",
            "table",
            LATEST,
            (
                "timestamp",
                "event_id",
                "project_id",
                "provider",
                "model",
                "status",
                "http_status",
                "error_type",
                "documents",
                "latency_ms",
                "fallbacks_tried",
            ),
            width=24,
            height=10,
        ),
    ),
)
