"""ClickHouse unreachable: accepted events wait in the spool, 202s continue until the
spool is full (then 503 + Retry-After), and everything is stored once when it is back."""

from __future__ import annotations

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
