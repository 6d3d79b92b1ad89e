-- Every idempotency key (event_id, probe_id) ever stored, per stream: the exact index
-- the dedup gate consults when its in-memory filter says "maybe seen".
--
-- Engine: ReplacingMergeTree keyed by (stream, id). Only existence is ever asked, so a
-- transient second row (a replay after a crash) changes no answer and is merged away.
-- ORDER BY (stream, id) makes "which of these ids exist" a primary-key point lookup
-- instead of a scan of the event table. Not partitioned by time: a retry may name an
-- event of any age up to the 400-day acceptance window. Rows are ~30 bytes compressed.
CREATE TABLE IF NOT EXISTS ingested_ids
(
    stream      LowCardinality(String),
    id          String,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY (stream, id)
COMMENT 'Idempotency keys of stored events and probes, for exact duplicate checks';
