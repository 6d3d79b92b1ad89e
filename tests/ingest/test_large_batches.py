"""Bodies past INLINE_MAX_BYTES are decoded and submitted (gate + spool write) in the
decode thread, not on the event loop: the answers, the exactly-once counts, the 503s and
what reaches storage must be those of the loop path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from fastapi.testclient import TestClient

from metering.ingest.decode import INLINE_MAX_BYTES
from metering.services import Services
from tests.ingest.helpers import event, stored_count

PADDING = "x" * 400  # a key outside the schema that makes the bodies large


def send(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> Any:
    body = msgspec.json.encode({"events": events})
    return client.post(
        "/v1/events", content=body, headers={**headers, "content-type": "application/json"}
    )


def large_batch(start: int, count: int) -> list[dict[str, Any]]:
    events = [
        event(i, note=PADDING, ingested_at="2030-01-01T00:00:00Z")
        for i in range(start, start + count)
    ]
    assert len(msgspec.json.encode({"events": events})) > INLINE_MAX_BYTES
    return events


def test_large_partial_batch_counts_exactly_and_stores_only_schema_keys(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    """Rejected items, retries of stored events and a repeat in one large body: every
    count as on the loop path, and the valid items' bytes as sent reach ClickHouse
    without their keys outside the schema (ingested_at stays the server's)."""
    assert send(client, admin_headers, [event(i) for i in range(10)]).json()["accepted"] == 10
    events = large_batch(0, 3_000)
    events[100]["documents"] = -1
    events[200]["tenant_id"] = "acme corp"
    events.append(events[300])
    response = send(client, admin_headers, events)
    assert response.status_code == 202
    result = response.json()
    assert result["accepted"] == 3_000 - 10 - 2
    assert result["duplicates"] == 10 + 1
    assert [r["index"] for r in result["rejected"]] == [100, 200]
    assert stored_count(services) == (2_998, 2_998)
    [(latest,)] = services.ch.query("SELECT max(ingested_at) FROM rerank_events").result_rows
    assert latest < datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=5)
    again = send(client, admin_headers, events).json()
    assert (again["accepted"], again["duplicates"]) == (0, 2_999)
    assert stored_count(services) == (2_998, 2_998)


def test_large_batch_refused_by_a_full_spool_is_503_then_accepted_once(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    spool = services.events.spool
    limit, spool.max_bytes = spool.max_bytes, 1_000
    events = large_batch(0, 3_000)
    try:
        refused = send(client, admin_headers, events)
    finally:
        spool.max_bytes = limit
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert refused.json()["error"].startswith("spool: cannot store events now")
    # Nothing of the refused batch counts as seen: the retry is accepted, once.
    assert send(client, admin_headers, events).json()["accepted"] == 3_000
    assert stored_count(services) == (3_000, 3_000)


def test_large_batch_while_starting_is_503_and_not_admitted(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    events = large_batch(0, 3_000)
    services.ready = False
    try:
        response = send(client, admin_headers, events)
    finally:
        services.ready = True
    assert response.status_code == 503
    assert response.json()["error"] == "service: starting, applying migrations"
    assert send(client, admin_headers, events).json()["accepted"] == 3_000
