-- One row per gateway rerank request, written only by the ingest writer after the
-- dedup gate has admitted its event_id, so the table holds each event_id once and
-- every read is exact without FINAL.
--
-- Engine: plain MergeTree. Deduplication happens before the insert (see
-- docs/exactly-once.md), so no Replacing/Collapsing engine and no query-time FINAL.
-- ORDER BY (day, tenant_id, project_id, timestamp): platform figures filter by a time
-- window (the day prefix prunes granules), tenant and project figures add a tenant and
-- project filter inside each day, and the request log reads newest first per day.
-- PARTITION BY month: invoices, budgets and retention all work in calendar months; a
-- month is the unit we drop or re-bill. No TTL: usage is billing evidence, kept until an
-- operator drops old partitions.
CREATE TABLE IF NOT EXISTS rerank_events
(
    event_id      String CODEC(ZSTD(1)),
    timestamp     DateTime64(3, 'UTC') CODEC(Delta(8), ZSTD(1)),
    tenant_id     String CODEC(ZSTD(1)),
    project_id    String CODEC(ZSTD(1)),
    api_key_id    String CODEC(ZSTD(1)),
    provider      LowCardinality(String),
    model         LowCardinality(String),
    region        LowCardinality(String) DEFAULT 'global',
    status        Enum8('ok' = 1, 'error' = 2),
    http_status   UInt16 CODEC(T64, ZSTD(1)),
    error_type    LowCardinality(String),
    queries       UInt32 DEFAULT 1 CODEC(T64, ZSTD(1)),
    documents     UInt32 CODEC(T64, ZSTD(1)),
    input_tokens  UInt64 CODEC(T64, ZSTD(1)),
    output_tokens UInt64 CODEC(T64, ZSTD(1)),
    latency_ms    Float64 CODEC(Gorilla, ZSTD(1)),
    fallbacks     Array(Tuple(
                      provider LowCardinality(String),
                      model String,
                      region String,
                      latency_ms Float64,
                      error_type String,
                      http_status UInt16)),
    ingested_at   DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta(8), ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (toDate(timestamp), tenant_id, project_id, timestamp)
COMMENT 'Raw rerank events, one row per event_id (deduplicated before insert)';
