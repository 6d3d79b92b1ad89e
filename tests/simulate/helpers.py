"""Shared by the simulate tests: a small backfill plan and stored rows read back as the
contract JSON a gateway would have sent."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client
from sqlalchemy import Engine

from metering.simulate.backfill import BackfillPlan, BackfillReport

END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
PLAN = BackfillPlan(days=2, events=20_000, tenants=300, seed=7, end=END)

EVENT_COLUMNS = (
    "event_id, timestamp, tenant_id, project_id, api_key_id, provider, model, region, status,"
    " http_status, error_type, queries, documents, input_tokens, output_tokens, latency_ms,"
    " fallbacks"
)


@dataclass
class Filled:
    ch: Client
    engine: Engine
    report: BackfillReport


def scalar(ch: Client, sql: str, **params: Any) -> Any:
    return ch.query(sql, parameters=params).result_rows[0][0]


def as_contract_event(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as the JSON event a gateway would have sent (0 / '' = absent)."""
    event = {k: v for k, v in row.items() if v not in ("", 0) or k == "output_tokens"}
    event["timestamp"] = row["timestamp"].replace(tzinfo=UTC).isoformat()
    event["fallbacks"] = [
        {k: v for k, v in fb.items() if v not in ("", 0)} for fb in row["fallbacks"]
    ]
    return event


def stored_events(ch: Client, limit: int = 1_000_000) -> list[dict[str, Any]]:
    result = ch.query(f"SELECT {EVENT_COLUMNS} FROM rerank_events ORDER BY event_id LIMIT {limit}")
    return [
        as_contract_event(dict(zip(result.column_names, r, strict=True)))
        for r in result.result_rows
    ]
