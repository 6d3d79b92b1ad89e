"""Prometheus metrics of the service (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "metering_http_requests_total",
    "HTTP requests by route template, method and status code",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "metering_http_request_duration_seconds",
    "HTTP request latency by route template",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
INGEST_ITEMS = Counter(
    "metering_ingest_items_total",
    "Ingested items by stream (events, probes) and outcome (accepted, duplicate, rejected)",
    ["stream", "outcome"],
    registry=REGISTRY,
)
SPOOL_BYTES = Gauge(
    "metering_spool_pending_bytes",
    "Bytes accepted into the spool and not yet stored in ClickHouse",
    ["stream"],
    registry=REGISTRY,
)
STORED_ROWS = Counter(
    "metering_clickhouse_rows_stored_total",
    "Rows the ingest writer stored in ClickHouse",
    ["stream"],
    registry=REGISTRY,
)
STORE_FAILURES = Counter(
    "metering_clickhouse_store_failures_total",
    "Failed ClickHouse inserts of the ingest writer (retried)",
    ["stream"],
    registry=REGISTRY,
)
STORE_SECONDS = Histogram(
    "metering_clickhouse_store_seconds",
    "Duration of one ingest writer cycle (insert rows and ids)",
    ["stream"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
GATE_LOOKUPS = Counter(
    "metering_dedup_lookups_total",
    "Exact ClickHouse lookups made by the dedup gate (Bloom positives and old retries)",
    ["stream"],
    registry=REGISTRY,
)
SPOOL_REPLAYED = Counter(
    "metering_spool_replayed_items_total",
    "Items a starting process found in its spool after the checkpoint (left by a crash or an "
    "undrained stop) and stored in ClickHouse, exactly once, before taking traffic",
    ["stream"],
    registry=REGISTRY,
)
BUDGET_RESYNC_SECONDS = Histogram(
    "metering_budget_resync_seconds",
    "Duration of one exact rebuild of budget spend from ClickHouse",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
BUDGET_HOLD_SECONDS = Histogram(
    "metering_budget_writer_hold_seconds",
    "How long a budget resync held the ingest writer (until the cut was stored)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
BUDGET_DRIFT_USD = Gauge(
    "metering_budget_spend_drift_usd",
    "Sum of |ledger spend - ClickHouse spend| over budget scopes found by the last "
    "reconciliation (corrected when found; 0 is the expected value)",
    registry=REGISTRY,
)
AUTHORIZE_REPLICA_UP = Gauge(
    "metering_authorize_replica_up",
    "1 while the authorize replica (METERING_AUTHORIZE_PORT) is fed, else 0",
    registry=REGISTRY,
)
AUTHORIZE_REPLICA_STARTS = Counter(
    "metering_authorize_replica_starts",
    "Authorize replica processes started (more than one: it exited or stopped reading)",
    registry=REGISTRY,
)
BUDGET_DRIFTED_SCOPES = Gauge(
    "metering_budget_drifted_scopes",
    "Budget scopes whose in-memory spend differed from ClickHouse at the last reconciliation",
    registry=REGISTRY,
)
BUDGET_ALERTS = Counter(
    "metering_budget_alerts_fired_total",
    "Budget alerts fired by kind (threshold, forecast)",
    ["kind"],
    registry=REGISTRY,
)
ALERT_DELIVERIES = Counter(
    "metering_alert_deliveries_total",
    "Alert delivery attempts by channel type and outcome (delivered, retry, failed)",
    ["channel", "outcome"],
    registry=REGISTRY,
)
FIGURES_CACHE = Counter(
    "metering_figures_whole_hours_total",
    "Reads of kept whole-hour answers by kind (platform: stats; facts: usage; kept: a"
    " tenant's request-log hours) and result: hit (proved current by system.parts) or miss"
    " (read from ClickHouse)",
    ["kind", "result"],
    registry=REGISTRY,
)
