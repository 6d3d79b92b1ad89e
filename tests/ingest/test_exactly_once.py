"""Resending any mix of accepted events changes no figure: in a batch, across batches,
after a restart, from two clients at once, and after a failed ClickHouse insert."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
from fastapi.testclient import TestClient

from metering import metrics
from metering.app import create_app, wait_ready
from metering.ingest.decode import Decoded
from metering.ingest.structs import Event
from metering.services import Services
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event, failing_first, probe, stored_count

WAIT = 60.0  # bound of every wait below


def replayed_items() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "metering_spool_replayed_items_total", {"stream": "events"}
    )
    return value or 0.0


def send(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> Any:
    response = client.post(
        "/v1/events",
        content=msgspec.json.encode({"events": events}),
        headers={**headers, "content-type": "application/json"},
    )
    assert response.status_code == 202, response.text
    return response.json()


def test_repeat_inside_one_batch_counts_once(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    batch = [event(1), event(2), event(1), event(3), event(2, documents=999)]
    assert send(client, admin_headers, batch) == {"accepted": 3, "duplicates": 2, "rejected": []}
    assert stored_count(services) == (3, 3)
    docs = services.ch.query("SELECT documents FROM rerank_events WHERE event_id = 'evt-2'")
    assert docs.result_rows == [(50,)]  # the first occurrence wins


def test_invalid_first_copy_does_not_shadow_a_valid_one(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    result = send(client, admin_headers, [event(1, documents=-1), event(1)])
    assert (result["accepted"], result["duplicates"], len(result["rejected"])) == (1, 0, 1)
    assert stored_count(services) == (1, 1)


def test_resend_across_batches(settings: Settings, admin_headers: dict[str, str]) -> None:
    first = [event(i) for i in range(1000)]
    mixed = [event(i) for i in range(500, 1500)]
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as client:
        wait_ready(app)
        assert send(client, admin_headers, first)["accepted"] == 1000
        assert send(client, admin_headers, first)["duplicates"] == 1000
        assert send(client, admin_headers, mixed) == {
            "accepted": 500,
            "duplicates": 500,
            "rejected": [],
        }
    # Old retries are answered from ClickHouse once the in-memory layers forgot them: a
    # new process's gate holds only a Bloom filter rebuilt from the stored ids.
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as client:
        services = wait_ready(app)
        lookups = services.events.gate.lookups
        assert send(client, admin_headers, [event(7), event(1499), event(5000)]) == {
            "accepted": 1,
            "duplicates": 2,
            "rejected": [],
        }
        assert services.events.gate.lookups == lookups + 1
        assert stored_count(services) == (1501, 1501)


def test_probes_are_deduplicated_too(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    for _ in range(2):
        client.post(
            "/v1/probes", json={"probes": [probe(1), probe(2), probe(1)]}, headers=admin_headers
        )
    assert stored_count(services, "uptime_probes") == (2, 2)


def test_two_clients_sending_the_same_batch_at_once(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    batches = [[event(f"{b}-{i}") for i in range(500)] for b in range(20)]
    results: list[dict[str, int]] = []
    lock = threading.Lock()

    def worker() -> None:
        for batch in batches:
            result = send(client, admin_headers, batch)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), "a sender did not finish"
    assert sum(r["accepted"] for r in results) == 20 * 500
    assert sum(r["duplicates"] for r in results) == 2 * 20 * 500
    assert stored_count(services) == (10_000, 10_000)


def test_resend_after_restart(settings: Settings, admin_headers: dict[str, str]) -> None:
    batch = [event(i) for i in range(2000)]
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as first:
        wait_ready(app)
        assert send(first, admin_headers, batch)["accepted"] == 2000
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as second:
        services = wait_ready(app)
        assert send(second, admin_headers, batch) == {
            "accepted": 0,
            "duplicates": 2000,
            "rejected": [],
        }
        assert send(second, admin_headers, [event(5), event(2001)])["accepted"] == 1
        assert stored_count(services) == (2001, 2001)
        # A restart applies no migration twice and keeps every row.
        assert services.migrate() == ([], [])


def test_failed_insert_is_retried_without_double_counting(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    """The rows reach ClickHouse but the id insert fails: the retry must skip the rows."""
    store = services.events.store
    real_insert_ids = store.insert_ids
    flaky_insert_ids = failing_first(
        2, real_insert_ids, ConnectionError("simulated failure after the rows were stored")
    )
    store.insert_ids = flaky_insert_ids  # type: ignore[method-assign]
    try:
        assert send(client, admin_headers, [event(i) for i in range(300)])["accepted"] == 300
        assert services.events.wait_stored(timeout=15)
    finally:
        store.insert_ids = real_insert_ids  # type: ignore[method-assign]
    assert flaky_insert_ids.left == 0
    assert stored_count(services) == (300, 300)
    ids = services.ch.query("SELECT count() FROM ingested_ids FINAL WHERE stream = 'events'")
    assert ids.result_rows == [(300,)]


def test_spool_replay_after_crash_stores_once(
    settings: Settings, admin_headers: dict[str, str]
) -> None:
    """Records spooled but not stored (the process died before its writer ran) are stored
    at the next start, once. The first "process" is the pipeline's public API without a
    writer: submit, wait until durable, stop there (tests/ingest/test_crash.py does the
    same with kill -9 on a real server)."""
    items = [msgspec.convert(event(i), Event) for i in range(100)]
    crashed = Services.open(settings, ADMIN_TOKEN)
    crashed.migrate()
    submitted = crashed.events.submit(Decoded(items, []))
    crashed.events.wait_durable(submitted)
    assert submitted.accepted == 100 and crashed.events.spool.pending_bytes > 0
    crashed.events.spool.close()  # nothing drained, no checkpoint moved
    crashed.engine.dispose()
    replayed = replayed_items()
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as second:
        services = wait_ready(app)
        assert services.events.spool.pending_bytes == 0
        assert replayed_items() == replayed + 100
        assert send(second, admin_headers, [event(i) for i in range(100)])["duplicates"] == 100
        assert stored_count(services) == (100, 100)
