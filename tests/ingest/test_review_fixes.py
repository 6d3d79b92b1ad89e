"""Holes found in review, each pinned by a test: UTC days on retry, duplicates that
wait for the first copy's spool write, a writer that survives read errors, lookups that
fail with 503, a key cache that cannot re-cache a revoked key, and spool checkpoints
damaged by power loss."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from metering.auth.service import KeyCache, Principal
from metering.ingest.spool import Spool
from metering.services import Services
from metering.tenants.registration import register_from_clickhouse
from tests.ingest.helpers import event, failing_first, stored_count


def send(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> Any:
    return client.post(
        "/v1/events",
        content=msgspec.json.encode({"events": events}),
        headers={**headers, "content-type": "application/json"},
    )


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
    assert services.events.wait_stored(timeout=20)
    assert flaky.left == 0
    assert stored_count(services) == (50, 50)


def test_duplicates_wait_for_the_first_copy_to_be_durable(
    client: TestClient,
    services: Services,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    real_writev = os.writev

    def held_then_full(fd: int, buffers: list[bytes]) -> int:
        release.wait(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", held_then_full)
    batch = [event(i) for i in range(10)]
    results: dict[str, Any] = {}

    def first() -> None:
        results["first"] = send(client, admin_headers, batch)

    thread = threading.Thread(target=first)
    thread.start()
    while services.events.gate.pending_count == 0:
        pass
    retry_done = threading.Event()

    def retry() -> None:
        results["retry"] = send(client, admin_headers, batch)
        retry_done.set()

    retry_thread = threading.Thread(target=retry)
    retry_thread.start()
    assert not retry_done.wait(0.5), "a duplicate was answered before the first copy was written"
    release.set()
    thread.join()
    retry_thread.join()
    monkeypatch.setattr(os, "writev", real_writev)
    assert results["first"].status_code == 503
    assert results["retry"].status_code == 503  # not "202 duplicate" for a lost event
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "spool_events" in ready.json()["problems"]


def test_writer_survives_a_spool_read_error(
    client: TestClient, services: Services, admin_headers: dict[str, str]
) -> None:
    spool = services.events.spool
    real_read = spool.read
    fail = {"left": 2}

    def flaky_read(*args: Any, **kwargs: Any) -> Any:
        if fail["left"]:
            fail["left"] -= 1
            raise OSError(24, "Too many open files")
        return real_read(*args, **kwargs)

    spool.read = flaky_read  # type: ignore[method-assign]
    assert send(client, admin_headers, [event(i) for i in range(5)]).json()["accepted"] == 5
    assert services.events.wait_stored(timeout=20)
    assert stored_count(services) == (5, 5)


def test_failing_duplicate_lookup_is_503(
    client: TestClient, services: Services, admin_headers: dict[str, str]
) -> None:
    batch = [event(i) for i in range(5)]
    assert send(client, admin_headers, batch).json()["accepted"] == 5
    services.events.wait_stored()
    services.events.gate._recent.clear()
    services.events.gate._recent_old.clear()
    store = services.events.store
    real = store.existing_ids

    def down(ids: list[str]) -> set[str]:
        raise ConnectionError("ClickHouse unreachable")

    store.existing_ids = down  # type: ignore[method-assign]
    response = send(client, admin_headers, batch)
    store.existing_ids = real  # type: ignore[method-assign]
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"].startswith("cannot check for duplicates now")
    assert send(client, admin_headers, batch).json()["duplicates"] == 5


def test_trailing_newline_breaks_the_character_set(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    response = send(client, admin_headers, [event(1, tenant_id="acme\n", provider="cohere\n")])
    assert response.json()["rejected"][0]["errors"] == [
        "tenant_id: must contain only [A-Za-z0-9_.:-]",
        "provider: must contain only [a-z0-9_-]",
    ]


def test_ndjson_line_with_two_events_is_rejected(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    line = msgspec.json.encode(event(1)) + b"," + msgspec.json.encode(event(2))
    body = msgspec.json.encode(event(0)) + b"\n" + line + b"\n"
    response = client.post(
        "/v1/events",
        content=body,
        headers={**admin_headers, "content-type": "application/x-ndjson"},
    )
    result = response.json()
    assert result["accepted"] == 1
    assert [r["index"] for r in result["rejected"]] == [1]
    assert result["rejected"][0]["errors"][0].startswith("event: not valid JSON")


def test_revoked_key_is_not_cached_by_a_racing_lookup() -> None:
    cache = KeyCache()
    principal = Principal("key", frozenset({"ingest"}), None, "key_1")
    cache.forget_key("key_1")  # revoked while a lookup was in flight...
    cache.put("mk_secret", principal)  # ...which then tries to cache it
    assert cache.get("mk_secret") is None


def test_unreadable_checkpoint_replays_from_the_oldest_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30, fsync=True)
    first = spool.append(b"", b"[1]", 1)
    spool.append(b"", b"[2]", 1)
    spool.commit(first, 0)
    spool.close()
    (tmp_path / "checkpoint").write_text("")  # a power loss left it empty
    again = Spool(tmp_path, max_bytes=1 << 30, fsync=True)
    records = again.read(again.checkpoint, max_bytes=1 << 20, max_count=10)
    assert [r.data for r in records] == [b"[1]", b"[2]"]  # too much is safe, too little not
    again.close()


def test_checkpoint_past_the_end_is_clamped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30, fsync=False)
    end = spool.append(b"", b"[1]", 1)
    spool.close()
    (tmp_path / "checkpoint").write_text(f"{end.segment} {end.offset + 500}\n")
    again = Spool(tmp_path, max_bytes=1 << 30, fsync=False)
    assert again.checkpoint == end
    again.append(b"", b"[2]", 1)
    assert [r.data for r in again.read(again.checkpoint, max_bytes=1 << 20, max_count=9)] == [
        b"[2]"
    ]
    again.close()


def test_register_tenants_job_backfills_missed_registrations(
    client: TestClient, services: Services, admin_headers: dict[str, str]
) -> None:
    services.events._on_keys = None  # registrations lost
    events = [event(i, tenant_id=f"acct-{i % 2}", project_id="p") for i in range(4)]
    assert send(client, admin_headers, events).json()["accepted"] == 4
    stored_count(services)
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tenants")).scalar() == 0
    assert register_from_clickhouse(services.ch, services.engine) == 2
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM tenants ORDER BY id")).scalars().all() == [
            "acct-0",
            "acct-1",
        ]
