"""Demo data for `metering serve --demo`: 30 days of simulated traffic in an empty store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from metering.simulate.backfill import BackfillPlan, backfill

if TYPE_CHECKING:
    from metering.services import Services

COUNT_EVENTS = "SELECT count() FROM rerank_events"
DEMO_EVENTS = 2_000_000
DEMO_TENANTS = 2_000
DEMO_SEED = 0
DEMO_PREFIX = "demo"


def demo_hook(services: Services) -> None:
    """Fill an empty store with 30 days of demo traffic ending now; otherwise do nothing."""
    if int(services.ch.query(COUNT_EVENTS).result_rows[0][0]):
        return
    plan = BackfillPlan(
        days=30,
        events=DEMO_EVENTS,
        tenants=DEMO_TENANTS,
        seed=DEMO_SEED,
        end=datetime.now(UTC),
        id_prefix=DEMO_PREFIX,
    )
    # A client of its own: the shared one serializes its calls, and /readyz must not
    # wait behind seconds of inserts.
    from metering.clickhouse.client import make_client

    settings = services.settings
    ch = make_client(settings.resolved_clickhouse_url, settings.clickhouse_database)
    try:
        report = backfill(ch, services.engine, plan)
    finally:
        ch.close()
    # The gates' Bloom filters were built before these ids existed.
    services.events.gate.rebuild(services.events.store.count_ids())
    services.probes.gate.rebuild(services.probes.store.count_ids())
    print(
        f"metering: demo data: {report.events:,} events, {report.probes:,} probes, "
        f"{report.tenants:,} tenants over 30 days ({report.seconds:.1f} s)",
        flush=True,
    )
