"""Tenants and projects registered on first sight of their events.

Called by the ingest writer after it stored a batch; idempotent (insert-or-ignore), so
several writers or a replay may register the same pair at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from clickhouse_connect.driver.client import Client
from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from billing.db import utcnow
from metering.tenants.models import Project, Tenant, TenantNumber


def register_pairs(engine: Engine, pairs: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Insert any tenant and (tenant, project) not yet known, give each new tenant its
    dense number; never fails on repeats. Returns the number of every tenant named."""
    pairs = sorted(set(pairs))
    if not pairs:
        return {}
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    now = utcnow()
    tenants = [{"id": t, "first_seen_at": now} for t in sorted({t for t, _ in pairs})]
    projects = [{"tenant_id": t, "id": p, "first_seen_at": now} for t, p in pairs]
    # executemany: SQLAlchemy batches it into multi-row INSERTs ("insertmanyvalues")
    # without compiling one giant statement per chunk.
    with engine.begin() as conn:
        conn.execute(insert(Tenant).on_conflict_do_nothing(), tenants)
        conn.execute(insert(Project).on_conflict_do_nothing(), projects)
        return _number(conn, sorted({t for t, _ in pairs}))


def register_tenants(engine: Engine, tenant_ids: Iterable[str]) -> dict[str, int]:
    """Register and number tenants (no projects); returns every tenant's number."""
    ids = sorted(set(tenant_ids))
    if not ids:
        return {}
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(Tenant).on_conflict_do_nothing(), [{"id": t, "first_seen_at": now} for t in ids]
        )
        return _number(conn, ids)


def _number(conn: Connection, ids: list[str]) -> dict[str, int]:
    """Give each tenant of `ids` a number if it has none; return all their numbers."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    conn.execute(insert(TenantNumber).on_conflict_do_nothing(), [{"tenant_id": t} for t in ids])
    found: dict[str, int] = {}
    for start in range(0, len(ids), 5_000):
        chunk = ids[start : start + 5_000]
        query = select(TenantNumber.tenant_id, TenantNumber.num).where(
            TenantNumber.tenant_id.in_(chunk)
        )
        found.update((row[0], row[1]) for row in conn.execute(query))
    return found


DISTINCT_PAIRS = "SELECT DISTINCT tenant_id, project_id FROM rerank_events"


def register_from_clickhouse(ch: Client, engine: Engine, chunk: int = 50_000) -> int:
    """Register every (tenant, project) that has events: the backstop for a registration
    the ingest writer could not make (the relational store was down and the process
    stopped before it retried). Idempotent; returns the pairs seen."""
    seen = 0
    with ch.query_rows_stream(DISTINCT_PAIRS) as rows:
        batch: list[tuple[str, str]] = []
        for tenant_id, project_id in rows:
            batch.append((tenant_id, project_id))
            if len(batch) >= chunk:
                register_pairs(engine, batch)
                seen += len(batch)
                batch = []
        register_pairs(engine, batch)
        seen += len(batch)
    return seen
