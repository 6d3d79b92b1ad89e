"""Parts stored before a projection existed get it at start-up, in the background."""

from __future__ import annotations

import time
from typing import Any

from metering.analytics.projections import materialize_missing
from metering.clickhouse.migrations import migrate
from metering.ingest.structs import Event

ROW = (
    b'{"event_id":"e%d","timestamp":"2026-11-01T10:00:%02dZ","tenant_id":"t","project_id":"p",'
    b'"provider":"cohere","model":"m","status":"ok","documents":1,"input_tokens":1,'
    b'"latency_ms":1}'
)


def test_older_parts_get_the_projections(ch_client: Any) -> None:
    migrate(ch_client)
    assert materialize_missing(ch_client) == []  # an empty table lacks nothing
    ch_client.command("ALTER TABLE rerank_events DROP PROJECTION p_by_time")
    for i in range(3):
        ch_client.raw_insert(
            "rerank_events", Event.__struct_fields__, ROW % (i, i), fmt="JSONEachRow"
        )
    ch_client.command(
        "ALTER TABLE rerank_events ADD PROJECTION p_by_time (SELECT * ORDER BY timestamp)"
    )
    assert materialize_missing(ch_client) == ["p_by_time"]
    deadline = time.monotonic() + 60
    while materialize_missing_count(ch_client) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert materialize_missing(ch_client) == []
    rows = ch_client.query(
        "SELECT count() FROM rerank_events WHERE timestamp >= '2026-11-01 10:00:01'",
        settings={"force_optimize_projection": 1},
    ).result_rows
    assert rows == [(2,)]


def materialize_missing_count(ch_client: Any) -> int:
    return int(
        ch_client.query(
            "SELECT count() FROM system.mutations WHERE database = currentDatabase()"
            " AND table = 'rerank_events' AND NOT is_done"
        ).result_rows[0][0]
    )
