"""The scheduler's probe job against real local HTTP endpoints, and the job registry."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from metering.app import create_app, wait_ready
from metering.probes.job import Target, parse_targets, run_probes
from metering.scheduler import JOBS
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import stored_count


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/up" else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoints() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_parse_targets() -> None:
    assert parse_targets("cohere=https://a/x, azure@us-east=http://b:1/h") == [
        Target("cohere", "global", "https://a/x"),
        Target("azure", "us-east", "http://b:1/h"),
    ]
    assert parse_targets(None) == [] and parse_targets("") == []
    with pytest.raises(ValueError, match="METERING_PROBE_TARGETS: 'Cohere=x'"):
        parse_targets("Cohere=x")


def test_probe_job_stores_up_and_down(settings: Settings, endpoints: str) -> None:
    closed = "http://127.0.0.1:9"  # discard port: connection refused
    targets = f"llmapi={endpoints}/up,cohere={endpoints}/down,bedrock@us-west={closed}/x"
    configured = settings.model_copy(update={"probe_targets": targets})
    app = create_app(configured, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app):
        services = wait_ready(app)
        assert JOBS["probe"].trigger(services) == {"trigger": "interval", "seconds": 30.0}
        assert run_probes(services) == 3
        assert stored_count(services, "uptime_probes") == (3, 3)
        rows = services.ch.query(
            "SELECT provider, region, ok, http_status, error != '' FROM uptime_probes"
            " ORDER BY provider"
        ).result_rows
    assert rows == [
        ("bedrock", "us-west", False, 0, True),
        ("cohere", "global", False, 503, True),
        ("llmapi", "global", True, 200, False),
    ]


def test_probe_job_is_not_scheduled_without_targets(services: object) -> None:
    assert JOBS["probe"].trigger(services) is None  # type: ignore[arg-type]
