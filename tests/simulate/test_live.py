"""Live mode: real-time traffic through the gateway client into the running app."""

from __future__ import annotations

from fastapi.testclient import TestClient

from metering.client import MeteringClient
from metering.services import Services
from metering.simulate.live import live
from metering.simulate.model import PROVIDERS
from tests.simulate.helpers import scalar


def test_live_sends_events_and_probes_through_the_gateway_client(
    client: TestClient,
    services: Services,
) -> None:
    sender = MeteringClient(
        "http://testserver",
        "test-admin-token",
        max_batch=500,
        flush_interval=0.1,
        transport=client._transport,  # the app, in process
    )
    try:
        report = live(sender, rate=2000, duration=0.5, seed=5, tenants=50, tick=0.05)
    finally:
        sender.close(timeout=10)
    assert report.generated_events == 1000  # rate x duration
    assert report.generated_probes == len(PROVIDERS)
    assert report.stats["accepted"] == report.generated_events + report.generated_probes
    assert report.stats["rejected"] == 0 and report.stats["duplicates"] == 0
    assert services.events.wait_stored(timeout=10)
    assert scalar(services.ch, "SELECT count() FROM rerank_events") == report.generated_events
