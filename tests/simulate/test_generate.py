"""Generated events and probes are valid contract items, whether formatted by the backfill's
SQL or by `event_dicts` in Python."""

from __future__ import annotations

from datetime import UTC

import msgspec

from metering.ingest.decode import EVENTS, PROBES, decode_batch
from metering.simulate.backfill import Backfill
from metering.simulate.generate import event_dicts
from tests.simulate.helpers import PLAN, Filled, stored_events


def test_every_simulated_event_and_probe_is_a_valid_contract_item(filled: Filled) -> None:
    events = stored_events(filled.ch)
    assert len(events) == 20_000
    assert any(e["fallbacks"] for e in events) and any(e["status"] == "error" for e in events)
    for start in range(0, len(events), 10_000):
        body = msgspec.json.encode({"events": events[start : start + 10_000]})
        decoded = decode_batch(EVENTS, body, ndjson=False)
        assert decoded.rejected == [] and len(decoded.items) == 10_000

    result = filled.ch.query(
        "SELECT probe_id, timestamp, provider, region, ok, latency_ms, http_status, error"
        " FROM uptime_probes"
    )
    probes = [
        {k: v for k, v in zip(result.column_names, r, strict=True) if v not in ("", 0)}
        | {"timestamp": r[1].replace(tzinfo=UTC).isoformat(), "ok": r[4], "latency_ms": r[5]}
        for r in result.result_rows
    ]
    decoded_probes = decode_batch(
        PROBES, msgspec.json.encode({"probes": probes[:10_000]}), ndjson=False
    )
    assert decoded_probes.rejected == []

    # The live path's JSON (built in Python, not in ClickHouse) is valid too, and names
    # tenants exactly as the backfill's SQL does.
    fill = Backfill(PLAN)
    cols = fill.chunk(0)
    python_events = event_dicts(cols, fill.tenants, fill.event_ids(0, len(cols)))
    body = msgspec.json.encode({"events": python_events[:10_000]})
    assert decode_batch(EVENTS, body, ndjson=False).rejected == []
    for made in python_events[:200]:
        stored = next(e for e in events if e["event_id"] == made["event_id"])
        for key in ("tenant_id", "project_id", "api_key_id", "provider", "region", "documents"):
            assert stored[key] == made[key]
