"""Dense tenant numbers, from the relational registry to ClickHouse.

Distinct accounts are counted exactly with Roaring bitmaps of tenant numbers (see
migrations/clickhouse/0004). The relational registry hands the numbers out (one
sequence, shared by every API replica); ClickHouse keeps a copy in `tenant_numbers`,
from which each event row is stamped at insert. The ingest writer calls `register`
for a batch's (tenant, project) pairs before inserting the batch, so a row's tenant
always has its number by then; if the relational store is down, the batch waits in the
spool and the writer retries it.

`sync` runs at start-up: it publishes any number ClickHouse lacks (a data dir whose
ClickHouse was restored from a backup, say) and rewrites rows stored before the
numbers existed (tenant_num = 0), registering their tenants first. The rewrite rebuilds
the projections that read tenant_num in the parts it rewrites.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from clickhouse_connect.driver.client import Client
from sqlalchemy import Engine, select

from metering.tenants.models import TenantNumber
from metering.tenants.registration import (
    register_from_clickhouse,
    register_pairs,
    register_tenants,
)

log = logging.getLogger(__name__)

PUBLISH = (
    "INSERT INTO tenant_numbers (tenant_id, num)"
    " SELECT tupleElement(pair, 1), tupleElement(pair, 2)"
    " FROM (SELECT arrayJoin(arrayZip({ids:Array(String)}, {nums:Array(UInt32)})) AS pair)"
)
PUBLISHED = "SELECT tenant_id FROM tenant_numbers"
UNNUMBERED = "SELECT count() FROM rerank_events WHERE tenant_num = 0"
RENUMBER = (
    "ALTER TABLE rerank_events UPDATE tenant_num = joinGet('tenant_numbers', 'num', tenant_id)"
    " WHERE tenant_num = 0 SETTINGS mutations_sync = 2"
)
MATERIALIZE = "ALTER TABLE rerank_events MATERIALIZE PROJECTION {name} SETTINGS mutations_sync = 2"
PROJECTIONS = ("p_hourly", "p_daily_tenants")
CHUNK = 20_000


class TenantNumbers:
    """Register tenants and keep their numbers published to ClickHouse."""

    def __init__(self, engine: Engine, clickhouse: Client | None = None) -> None:
        self._engine = engine
        self._client = clickhouse
        self._published: set[str] = set()
        self._lock = threading.Lock()

    def attach(self, clickhouse: Client) -> None:
        self._client = clickhouse

    def _clickhouse(self) -> Client:
        if self._client is None:
            raise RuntimeError("clickhouse: not connected yet")
        return self._client

    def register(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Register the pairs and publish the numbers of tenants not yet published."""
        numbers = register_pairs(self._engine, pairs)
        self._publish_new(numbers)

    def register_tenants(self, tenant_ids: Iterable[str]) -> None:
        """Number tenants (without projects) and publish them: a bulk load does this
        before inserting rows of its own."""
        self._publish_new(register_tenants(self._engine, tenant_ids))

    def _publish_new(self, numbers: dict[str, int]) -> None:
        with self._lock:
            new = {t: n for t, n in numbers.items() if t not in self._published}
            if new:
                self._publish(new)

    def _publish(self, numbers: dict[str, int]) -> None:
        items = sorted(numbers.items())
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            self._clickhouse().command(
                PUBLISH,
                parameters={"ids": [t for t, _ in chunk], "nums": [n for _, n in chunk]},
            )
        self._published.update(numbers)

    def sync(self) -> int:
        """Publish every number ClickHouse lacks and number rows stored without one;
        returns the rows renumbered."""
        ch = self._clickhouse()
        with self._lock:
            self._published = {row[0] for row in ch.query(PUBLISHED).result_rows}
            unnumbered = int(ch.query(UNNUMBERED).result_rows[0][0])
            if unnumbered:
                register_from_clickhouse(ch, self._engine)
            with self._engine.connect() as conn:
                known: dict[str, int] = dict(
                    (row[0], row[1])
                    for row in conn.execute(select(TenantNumber.tenant_id, TenantNumber.num))
                )
            missing = {t: n for t, n in known.items() if t not in self._published}
            if missing:
                self._publish(missing)
            if unnumbered:
                log.info("numbering %d event rows stored before tenant numbers", unnumbered)
                ch.command(RENUMBER)
        return unnumbered
