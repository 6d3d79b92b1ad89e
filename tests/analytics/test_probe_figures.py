"""Uptime and incidents from the scheduler's probes of a real local HTTP server that
fails on purpose: the uptime % is what the failures make it, and an incident opens
after the third failure in a row and closes at the next success."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient

from metering.app import create_app, wait_ready
from metering.probes.job import run_probes
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN

# What the provider answers to each probe, in order: 2 up, 2 down (no incident), 1 up,
# 4 down (an incident), 3 up.
SCRIPT = [200, 200, 503, 503, 200, 503, 500, 503, 502, 200, 204, 200]


class Scripted(BaseHTTPRequestHandler):
    answers: ClassVar[list[int]] = []
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            status = self.answers.pop(0) if self.answers else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def provider_url() -> Iterator[str]:
    Scripted.answers = list(SCRIPT)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()


def test_uptime_and_incident_from_a_failing_provider(settings: Settings, provider_url: str) -> None:
    configured = settings.model_copy(update={"probe_targets": f"cohere@eu-west={provider_url}"})
    app = create_app(configured, ADMIN_TOKEN, run_scheduler=False)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(app) as client:
        services = wait_ready(app)
        for _ in SCRIPT:
            assert run_probes(services) == 1
            time.sleep(0.005)  # distinct millisecond timestamps
        stats = client.get("/v1/stats", params={"window": "24h"}, headers=headers).json()
        assert stats["avg_uptime_pct"] == pytest.approx(100 * 6 / 12)
        providers = client.get("/v1/providers", params={"window": "24h"}, headers=headers).json()
        cohere = next(p for p in providers["providers"] if p["provider"] == "cohere")
        assert cohere["uptime_pct"] == pytest.approx(50.0)
        r = client.get("/v1/incidents", params={"window": "24h"}, headers=headers)
        assert r.status_code == 200, r.text
        incidents = r.json()["incidents"]
        rows = services.ch.query(
            "SELECT timestamp, ok FROM uptime_probes ORDER BY timestamp"
        ).result_rows
    assert len(incidents) == 1, incidents
    incident = incidents[0]
    assert (incident["provider"], incident["region"], incident["failed_probes"]) == (
        "cohere",
        "eu-west",
        4,
    )
    started = datetime.fromisoformat(incident["started_at"].replace("Z", "+00:00"))
    ended = datetime.fromisoformat(incident["ended_at"].replace("Z", "+00:00"))
    # The run starts at the 6th probe (the first of 4 failures) and ends at the 10th.
    assert [ok for _, ok in rows] == [s < 500 for s in SCRIPT]
    assert started.replace(tzinfo=None) == rows[5][0].replace(tzinfo=None)
    assert ended.replace(tzinfo=None) == rows[9][0].replace(tzinfo=None)
