"""Usage metering, billing and observability for an LLM rerank API gateway.

`metering` is the service: ingestion, the ClickHouse store, queries, probes, the HTTP
app, the CLI and the scheduler. It wires in `billing` (prices, rating, budgets,
invoices), which never imports `metering`.
"""

__version__ = "0.1.0"
