-- One row per uptime probe result (probe_id admitted once by the dedup gate).
--
-- Engine: plain MergeTree, for the same reason as rerank_events: duplicates never
-- reach it. Probes are few (a handful of targets every few seconds), so the table is
-- small; ORDER BY (provider, region, timestamp) serves per-provider uptime over a
-- window. PARTITION BY month to match the event table and its retention.
CREATE TABLE IF NOT EXISTS uptime_probes
(
    probe_id    String CODEC(ZSTD(1)),
    timestamp   DateTime64(3, 'UTC') CODEC(Delta(8), ZSTD(1)),
    provider    LowCardinality(String),
    region      LowCardinality(String) DEFAULT 'global',
    ok          Bool,
    latency_ms  Float64 CODEC(Gorilla, ZSTD(1)),
    http_status UInt16,
    error       String CODEC(ZSTD(1)),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (provider, region, timestamp)
COMMENT 'Uptime probe results, one row per probe_id (deduplicated before insert)';
