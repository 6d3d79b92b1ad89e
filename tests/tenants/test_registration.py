"""Tenant and project registration: the register-tenants job registers every pair that
has events, including those whose registration the ingest writer never made."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from metering.services import Services
from metering.tenants.registration import register_from_clickhouse, register_pairs


def test_register_tenants_job_backfills_missed_registrations(services: Services) -> None:
    # Rows stored without their registration (the relational store was down and the
    # process stopped before the writer retried): written straight to ClickHouse here.
    columns = ["event_id", "timestamp", "tenant_id", "project_id", "provider", "model"]
    columns += ["status", "documents", "input_tokens", "latency_ms"]
    now = datetime.now(UTC)
    rows: list[list[Any]] = [
        [f"e{i}", now, f"acct-{i % 2}", "p", "cohere", "m", "ok", 1, 1, 1.0] for i in range(4)
    ]
    services.ch.insert("rerank_events", rows, column_names=columns)
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tenants")).scalar() == 0
    assert register_from_clickhouse(services.ch, services.engine) == 2
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM tenants ORDER BY id")).scalars().all() == [
            "acct-0",
            "acct-1",
        ]
        assert conn.execute(text("SELECT count(*) FROM projects")).scalar() == 2


def test_registering_a_pair_twice_is_harmless(services: Services) -> None:
    register_pairs(services.engine, [("acct-1", "p1"), ("acct-1", "p2")])
    register_pairs(services.engine, [("acct-1", "p1"), ("acct-1", "p2"), ("acct-2", "p1")])
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tenants")).scalar() == 2
        assert conn.execute(text("SELECT count(*) FROM projects")).scalar() == 3
