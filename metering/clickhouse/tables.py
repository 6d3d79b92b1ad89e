"""The declared shape of every ClickHouse table the migrations create.

Code that reads or writes these tables relies on these columns; a test applies all
migrations to an empty database and checks the live tables (system.columns) against
this declaration, so a migration and the code cannot drift apart unnoticed.
"""

from __future__ import annotations

FALLBACK_TUPLE = (
    "Array(Tuple(provider LowCardinality(String), model String, region String, "
    "latency_ms Float64, error_type String, http_status UInt16))"
)

TABLES: dict[str, dict[str, str]] = {
    "rerank_events": {
        "event_id": "String",
        "timestamp": "DateTime64(3, 'UTC')",
        "tenant_id": "String",
        "tenant_num": "UInt32",
        "project_id": "String",
        "api_key_id": "String",
        "provider": "LowCardinality(String)",
        "model": "LowCardinality(String)",
        "region": "LowCardinality(String)",
        "status": "Enum8('ok' = 1, 'error' = 2)",
        "http_status": "UInt16",
        "error_type": "LowCardinality(String)",
        "queries": "UInt32",
        "documents": "UInt32",
        "input_tokens": "UInt64",
        "output_tokens": "UInt64",
        "latency_ms": "Float64",
        "fallbacks": FALLBACK_TUPLE,
        "ingested_at": "DateTime64(3, 'UTC')",
    },
    "uptime_probes": {
        "probe_id": "String",
        "timestamp": "DateTime64(3, 'UTC')",
        "provider": "LowCardinality(String)",
        "region": "LowCardinality(String)",
        "ok": "Bool",
        "latency_ms": "Float64",
        "http_status": "UInt16",
        "error": "String",
        "ingested_at": "DateTime64(3, 'UTC')",
    },
    "ingested_ids": {
        "stream": "LowCardinality(String)",
        "id": "String",
        "inserted_at": "DateTime",
    },
    "tenant_numbers": {
        "tenant_id": "String",
        "num": "UInt32",
    },
    "provider_peaks_hourly": {
        "hour": "DateTime('UTC')",
        "provider": "LowCardinality(String)",
        "requests": "UInt64",
        "peak": "UInt64",
    },
    "schema_migrations": {
        "version": "UInt32",
        "name": "String",
        "checksum": "String",
        "applied_at": "DateTime64(3, 'UTC')",
    },
}
