"""Simulated gateway traffic shaped like the seed product page (`metering simulate`).

The dashboard, the provider table and the invoices are only convincing over data with the
shape of the real thing. `model` holds the traffic model (providers, time of day, tenants,
documents, latency, failures); `generate` draws events and probes from it as numpy columns
and renders them as contract JSON; `backfill` writes a window of them straight into the
stores at engine speed (`metering simulate backfill`); `live` sends them in real time
through the gateway client (`metering simulate live`); `demo` fills an empty store for
`metering serve --demo`. The commands' arguments live in `metering.cli`.
"""
