"""The stream pipeline's writer and request path: a retried insert looks for its rows on
their UTC days, a duplicate is answered only once the first copy is on disk, and the
writer survives spool read errors."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient

from metering import metrics
from metering.services import Services
from tests.ingest.helpers import event, failing_first, stored_count

WAIT = 30.0  # bound of every wait below


def send(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> Any:
    return client.post(
        "/v1/events",
        content=msgspec.json.encode({"events": events}),
        headers={**headers, "content-type": "application/json"},
    )


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def duplicates_counted() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "metering_ingest_items_total", {"stream": "events", "outcome": "duplicate"}
    )
    return value or 0.0


def test_retry_after_failed_insert_uses_utc_days(
    client: TestClient, services: Services, admin_headers: dict[str, str]
) -> None:
    """20:00-05:00 is the next UTC day: the retry must look there and not insert again."""
    evening = (datetime.now(UTC) - timedelta(days=1)).astimezone(timezone(timedelta(hours=-5)))
    evening = evening.replace(hour=20, minute=0)
    store = services.events.store
    flaky = failing_first(1, store.insert_ids, ConnectionError("timed out after the rows landed"))
    store.insert_ids = flaky  # type: ignore[method-assign]
    events = [event(i, timestamp=(evening + timedelta(minutes=i)).isoformat()) for i in range(50)]
    assert send(client, admin_headers, events).json()["accepted"] == 50
    assert services.events.wait_stored(timeout=WAIT)
    assert flaky.left == 0
    assert stored_count(services) == (50, 50)


def test_duplicates_wait_for_the_first_copy_to_be_durable(
    client: TestClient,
    services: Services,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The retry of a batch whose first copy is still being written is answered with the
    first copy's outcome (here: the disk fails, 503 for both), never "202 duplicate"."""
    release = threading.Event()

    def held_then_full(fd: int, buffers: list[bytes]) -> int:
        release.wait(WAIT)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", held_then_full)
    batch = [event(i) for i in range(10)]
    results: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: results.update(first=send(client, admin_headers, batch))
    )
    retry = threading.Thread(
        target=lambda: results.update(retry=send(client, admin_headers, batch))
    )
    try:
        first.start()
        wait_until(lambda: services.events.gate.pending_count > 0, "the first copy's admission")
        before = duplicates_counted()
        retry.start()
        # The retry's keys are found pending (counted as duplicates) while the first
        # copy's write is held: the retry must now be waiting, not answered.
        wait_until(lambda: duplicates_counted() >= before + len(batch), "the retry's admission")
        assert "retry" not in results, "a duplicate was answered before the first copy was written"
    finally:
        release.set()
        first.join(WAIT)
        retry.join(WAIT)
    assert not first.is_alive() and not retry.is_alive()
    assert results["first"].status_code == 503
    assert results["retry"].status_code == 503  # not "202 duplicate" for a lost event


def test_writer_survives_a_spool_read_error(
    client: TestClient, services: Services, admin_headers: dict[str, str]
) -> None:
    spool = services.events.spool
    spool.read = failing_first(2, spool.read, OSError(24, "Too many open files"))  # type: ignore[method-assign]
    assert send(client, admin_headers, [event(i) for i in range(5)]).json()["accepted"] == 5
    assert services.events.wait_stored(timeout=WAIT)
    assert spool.read.left == 0  # type: ignore[attr-defined]
    assert stored_count(services) == (5, 5)
