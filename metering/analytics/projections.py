"""Projections for parts stored before a projection existed.

A migration that adds a projection covers only parts written after it; older parts are
still read exactly, from their rows, only slower. At start-up, any active part of
`rerank_events` lacking one of the projections gets it by a background mutation
(`MATERIALIZE PROJECTION`, not waited for): reads stay exact meanwhile.
"""

from __future__ import annotations

import logging

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

PROJECTIONS = ("p_hourly", "p_hourly_tenants", "p_daily_tenants", "p_by_time", "p_tenant_hourly")
MISSING = (
    "SELECT count() FROM system.parts AS p"
    " WHERE p.database = currentDatabase() AND p.table = 'rerank_events' AND p.active"
    " AND p.name NOT IN (SELECT parent_name FROM system.projection_parts"
    "  WHERE database = currentDatabase() AND table = 'rerank_events' AND active"
    "  AND name = {name:String})"
)
MATERIALIZE = "ALTER TABLE rerank_events MATERIALIZE PROJECTION {name}"


def materialize_missing(ch: Client) -> list[str]:
    """Start building every projection some active part lacks; return their names."""
    started = []
    for name in PROJECTIONS:
        missing = int(ch.query(MISSING, parameters={"name": name}).result_rows[0][0])
        if missing:
            log.info("materializing projection %s for %d older parts", name, missing)
            ch.command(MATERIALIZE.replace("{name}", name))
            started.append(name)
    return started
