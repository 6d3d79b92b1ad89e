"""`metering serve --demo`: the demo hook fills an empty store once, and the dedup gate
knows the ids it wrote."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from metering.services import Services
from metering.simulate import demo
from metering.tenants.models import Tenant
from tests.simulate.helpers import scalar, stored_events


def test_demo_hook_fills_an_empty_store_and_the_gate_knows_its_ids(
    client: TestClient,
    services: Services,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo, "DEMO_EVENTS", 30_000)
    monkeypatch.setattr(demo, "DEMO_TENANTS", 200)
    demo.demo_hook(services)
    assert scalar(services.ch, "SELECT count() FROM rerank_events") == 30_000
    assert scalar(services.ch, "SELECT count() FROM uptime_probes") == 30 * 2880 * 4
    with services.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Tenant)) == scalar(
            services.ch, "SELECT uniqExact(tenant_id) FROM rerank_events"
        )

    event = stored_events(services.ch, limit=1)[0]
    response = client.post("/v1/events", json={"events": [event]}, headers=admin_headers)
    assert response.status_code == 202
    assert response.json() == {"accepted": 0, "duplicates": 1, "rejected": []}

    demo.demo_hook(services)  # not empty any more: does nothing
    assert scalar(services.ch, "SELECT count() FROM rerank_events") == 30_000
