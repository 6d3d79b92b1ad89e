"""ClickHouse unreachable: accepted events wait in the spool, 202s continue until the
spool is full (then 503 + Retry-After), and everything is stored once when it is back."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from metering.app import create_app, wait_ready
from metering.services import Services
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event, stored_count


def send(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> Any:
    return client.post(
        "/v1/events",
        content=msgspec.json.encode({"events": events}),
        headers={**headers, "content-type": "application/json"},
    )


@pytest.fixture
def small_spool_client(settings: Settings) -> Any:
    small = settings.model_copy(update={"spool_max_bytes": 1024 * 1024})
    app = create_app(small, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as client:
        yield client, wait_ready(app)


def test_outage_spools_then_503_then_recovers(
    small_spool_client: Any, admin_headers: dict[str, str]
) -> None:
    client, services = small_spool_client
    store = services.events.store
    real_insert_rows = store.insert_rows
    down = {"flag": True}

    def unreachable(ndjson: bytes, settings: Any = None) -> None:
        if down["flag"]:
            raise ConnectionError("ClickHouse unreachable (simulated)")
        real_insert_rows(ndjson, settings)

    store.insert_rows = unreachable  # type: ignore[method-assign]
    accepted = 0
    batch_no = 0
    while True:
        response = send(client, admin_headers, [event(f"{batch_no}-{i}") for i in range(500)])
        if response.status_code == 503:
            break
        assert response.status_code == 202
        accepted += response.json()["accepted"]
        batch_no += 1
        assert batch_no < 100, "the spool never filled up"
    assert response.headers["retry-after"] == "5"
    assert "cannot store events now" in response.json()["error"]
    assert accepted >= 1000
    assert services.events.last_error and "unreachable" in services.events.last_error
    # The refused batch was not admitted: it is accepted once ClickHouse is back.
    refused = [event(f"{batch_no}-{i}") for i in range(500)]
    down["flag"] = False
    assert services.events.wait_stored(timeout=30)
    assert services.events.spool.pending_bytes == 0
    assert send(client, admin_headers, refused).json()["accepted"] == 500
    assert stored_count(services) == (accepted + 500, accepted + 500)


def test_unknown_tenants_and_projects_are_registered(
    client: TestClient, services: Services, admin_headers: dict[str, str]
) -> None:
    events = [event(i, tenant_id=f"acct-{i % 3}", project_id=f"proj-{i % 2}") for i in range(12)]
    assert send(client, admin_headers, events).json()["accepted"] == 12
    stored_count(services)
    with services.engine.connect() as conn:
        tenants = conn.execute(text("SELECT id FROM tenants ORDER BY id")).scalars().all()
        projects = conn.execute(
            text("SELECT tenant_id, id FROM projects ORDER BY tenant_id, id")
        ).all()
    assert tenants == ["acct-0", "acct-1", "acct-2"]
    assert [tuple(p) for p in projects] == [
        (f"acct-{t}", f"proj-{p}") for t in range(3) for p in range(2)
    ]


def test_registration_failure_never_drops_usage(
    client: TestClient, services: Services, admin_headers: dict[str, str]
) -> None:
    pipeline = services.events
    real = pipeline._on_keys
    calls = {"n": 0}

    def failing(pairs: set[tuple[str, str]]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("database briefly unavailable")
        assert real is not None
        real(pairs)

    pipeline._on_keys = failing
    assert send(client, admin_headers, [event(1, tenant_id="acct-late")]).json()["accepted"] == 1
    stored_count(services)
    assert send(client, admin_headers, [event(2, tenant_id="acct-late")]).json()["accepted"] == 1
    stored_count(services)
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM tenants")).scalars().all() == ["acct-late"]
    assert stored_count(services) == (2, 2)


@pytest.fixture
def small_disk_spool(settings: Settings) -> Iterator[tuple[Settings, Path]]:
    """The data dir's spool on a 4 MiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the spool's disk needs root")
    spool = settings.data_dir / "spool"
    spool.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(spool)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield settings, spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=True, timeout=30)


def test_a_full_disk_refuses_ingest_until_space_is_freed_then_recovers_by_itself(
    small_disk_spool: tuple[Settings, Path], admin_headers: dict[str, str]
) -> None:
    settings, spool = small_disk_spool
    filler = spool / "filler"
    filler.write_bytes(b"\0" * (3 * 1024 * 1024))  # leaves about 1 MiB for the spool
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as client:
        services = wait_ready(app)
        accepted = 0
        batch_no = 0
        while True:
            batch = [event(f"{batch_no}-{i}") for i in range(500)]
            response = send(client, admin_headers, batch)
            if response.status_code == 503:
                break
            assert response.status_code == 202
            accepted += response.json()["accepted"]
            batch_no += 1
            assert batch_no < 100, "the disk never filled up"
        assert accepted > 0
        assert response.headers["retry-after"]
        assert "No space left on device" in response.text
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "No space left on device" in ready.json()["problems"]["spool_events"]
        # Still full: the next batch is refused too (and leaves no torn record behind).
        assert send(client, admin_headers, batch).status_code == 503

        filler.unlink()  # the operator frees space; no restart
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.05)
        again = send(client, admin_headers, batch)  # the refused batch, retried
        assert again.status_code == 202 and again.json()["accepted"] == 500
        after = send(client, admin_headers, [event(f"after-{i}") for i in range(500)])
        assert after.status_code == 202 and after.json()["accepted"] == 500
        total = accepted + 1000
        assert stored_count(services) == (total, total)
        ids = services.ch.query("SELECT count() FROM ingested_ids FINAL WHERE stream = 'events'")
        assert ids.result_rows == [(total,)]
    # And a restart on the same spool replays nothing twice.
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app):
        assert stored_count(wait_ready(app)) == (total, total)
