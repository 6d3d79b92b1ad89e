-- p_by_time: every column of rerank_events again, sorted by timestamp alone.
--
-- The table is sorted by (day, tenant, project, timestamp), which keeps one tenant's
-- reads small, but a time range shorter than a day (a window's partial first and last
-- hour, the request log's newest page) then reads the whole day: its rows are spread
-- over every granule of the day. ClickHouse reads such ranges from this projection
-- instead (it picks the projection whose key prunes most), touching only the rows of
-- the range. The cost, measured when it was added: about 1.5x more disk for the events
-- and some insert speed (bench/RESULTS.md). Written in the same part as the rows, so it
-- is never out of step with them. Parts stored before this migration get it from the
-- start-up check (metering/analytics/projections.py), in the background.
ALTER TABLE rerank_events
    ADD PROJECTION IF NOT EXISTS p_by_time
    (
        SELECT *
        ORDER BY timestamp
    );
