-- Dense tenant numbers, and the rollups every figure is read from.
--
-- tenant_numbers: a copy of the relational registry's dense tenant numbers (the
-- registry hands them out; see metering/tenants). Engine Join(ANY, LEFT): a keyed
-- in-memory map that joinGet reads per row, kept on disk across restarts; the ingest
-- writer adds a tenant's number before it inserts the tenant's first event, so the
-- column default below always finds it. Inserting a number twice keeps the first (ANY).
CREATE TABLE IF NOT EXISTS tenant_numbers
(
    tenant_id String,
    num       UInt32
)
ENGINE = Join(ANY, LEFT, tenant_id)
COMMENT 'Dense tenant numbers (copy of the relational registry), stamped on event rows';

-- tenant_num: stamped on each event row at insert (the writer never sends it; a
-- client's value never reaches storage because rows are inserted with the event
-- schema's columns only). Rows stored before this migration read 0 until the start-up
-- backfill (metering/analytics/numbers.py) rewrites them.
ALTER TABLE rerank_events
    ADD COLUMN IF NOT EXISTS tenant_num UInt32 DEFAULT joinGet('tenant_numbers', 'num', tenant_id)
    AFTER tenant_id;

-- Rollups as aggregate projections. Parts written from now on carry them; parts
-- stored before are renumbered at start-up (metering/tenants/numbers.py), which also
-- materializes the projections there. A part without a projection is still read
-- exactly (from its rows), only slower.
-- A projection is stored inside each data part and
-- written in the same atomic step as the part's rows, so a rollup can never miss or
-- double a row whatever fails between inserts (no materialized view, no second table,
-- no window in which one was written and the other not). ClickHouse answers a query
-- from a projection when its GROUP BY keys and aggregates cover the query, reading
-- hundreds of rows instead of millions, and from the raw rows otherwise.
--
-- p_hourly: per UTC hour, serving provider, model and status: counts, exact sums
-- (UInt128 for tokens and pairs: UInt64 sums of UInt64 columns wrap), latency sum and
-- a DDSketch (relative error 1%), and the failed fallback attempts per provider tried.
ALTER TABLE rerank_events
    ADD PROJECTION IF NOT EXISTS p_hourly
    (
        SELECT
            toStartOfHour(timestamp),
            provider,
            model,
            status,
            count(),
            sum(documents),
            sum(toUInt128(queries) * documents),
            sum(toUInt128(input_tokens)),
            sum(toUInt128(output_tokens)),
            sum(latency_ms),
            quantilesDDState(0.01, 0.5, 0.95, 0.99)(latency_ms),
            sumMap(tupleElement(fallbacks, 'provider'), arrayWithConstant(length(fallbacks), toUInt64(1)))
        GROUP BY toStartOfHour(timestamp), provider, model, status
    );

-- p_hourly_tenants and p_daily_tenants: the distinct tenants of each UTC hour and day as
-- Roaring bitmaps of their dense numbers. A window's whole days read the daily ones (30
-- bitmaps for 30 days), its other whole hours the hourly ones. Kept apart from p_hourly:
-- a projection is read by granules, and bitmaps beside p_hourly's sums would be read
-- (and decoded) whenever its sums are.
ALTER TABLE rerank_events
    ADD PROJECTION IF NOT EXISTS p_hourly_tenants
    (
        SELECT toStartOfHour(timestamp), groupBitmapState(tenant_num)
        GROUP BY toStartOfHour(timestamp)
    );

ALTER TABLE rerank_events
    ADD PROJECTION IF NOT EXISTS p_daily_tenants
    (
        SELECT toDate(timestamp), groupBitmapState(tenant_num)
        GROUP BY toDate(timestamp)
    );

-- provider_peaks_hourly: per UTC hour and provider, the most requests (fallback attempts
-- included) in one second, with the hour's request count it was computed from. A peak
-- per second cannot be an aggregate projection (it is a max of counts, not mergeable
-- across parts), and per-second counts are nearly as many rows as events. So the
-- providers read computes an hour's peak from raw rows once and keeps it here; a later
-- read uses it only while the hour's count (from p_hourly) is still the same, and
-- recomputes the hour when late events changed it. Counts only grow, so an equal count
-- means the same events: exact. ReplacingMergeTree(requests): the newest computation of
-- an hour wins; reads take argMax and need no FINAL.
CREATE TABLE IF NOT EXISTS provider_peaks_hourly
(
    hour     DateTime('UTC'),
    provider LowCardinality(String),
    requests UInt64,
    peak     UInt64
)
ENGINE = ReplacingMergeTree(requests)
ORDER BY (hour, provider)
COMMENT 'Peak requests per second per provider and hour, keyed by the hour''s request count';
