-- p_tenant_hourly: per tenant and UTC hour, project, serving provider, model and status:
-- the counts and exact sums that usage and rating read (the same aggregates as p_hourly).
--
-- The table's key (day, tenant, project, timestamp) keeps one tenant's read inside each
-- day to that tenant's granules, but a 30-day window still reads at least one granule
-- (8,192 rows) per day and part, and then sums the tenant's raw rows: tens of
-- milliseconds for a sparse tenant, hundreds for a busy one. Keyed by tenant first, this
-- projection answers a tenant's hours from a few granules of pre-summed rows, and the
-- request log finds the newest hours a tenant has events in without reading days of
-- other tenants' rows. It also covers usage grouped by tenant or project platform-wide.
-- Like every projection it is written in the same part as the rows, so it can never
-- miss or double a row whatever fails (see 0004). Parts stored before this migration
-- get it from the start-up check (metering/analytics/projections.py), in the background.
ALTER TABLE rerank_events
    ADD PROJECTION IF NOT EXISTS p_tenant_hourly
    (
        SELECT
            tenant_id,
            toStartOfHour(timestamp),
            project_id,
            provider,
            model,
            status,
            count(),
            sum(documents),
            sum(toUInt128(queries) * documents),
            sum(toUInt128(input_tokens)),
            sum(toUInt128(output_tokens))
        GROUP BY tenant_id, toStartOfHour(timestamp), project_id, provider, model, status
    );
