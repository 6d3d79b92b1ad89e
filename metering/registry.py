"""Tenants and projects registered on first sight of their events.

Called by the ingest writer after it stored a batch; idempotent (insert-or-ignore), so
several writers or a replay may register the same pair at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from metering.models import Project, Tenant, utcnow


def register_pairs(engine: Engine, pairs: Iterable[tuple[str, str]]) -> None:
    """Insert any tenant and (tenant, project) not yet known; never fails on repeats."""
    pairs = sorted(set(pairs))
    if not pairs:
        return
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    now = utcnow()
    tenants = [{"id": t, "first_seen_at": now} for t in sorted({t for t, _ in pairs})]
    projects = [{"tenant_id": t, "id": p, "first_seen_at": now} for t, p in pairs]
    # executemany: SQLAlchemy batches it into multi-row INSERTs ("insertmanyvalues")
    # without compiling one giant statement per chunk.
    with engine.begin() as conn:
        conn.execute(insert(Tenant).on_conflict_do_nothing(), tenants)
        conn.execute(insert(Project).on_conflict_do_nothing(), projects)
