"""A client that leaves before its answer is the client's fault: counted under status 499
in /metrics (408 when the server timed its body out), and no traceback in the logs.

The real app over real stores, served by uvicorn with our protocol on loopback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metering.app import create_app, wait_ready
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.http.helpers import WAIT, Running, connect, read_until_closed, serving

# A JSON route parsed by FastAPI (pydantic body) and the raw ingest route.
ROUTES = ["/v1/api-keys", "/v1/events"]


@pytest.fixture
def live(settings: Settings) -> Iterator[Running]:
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with serving(app, lifespan="on") as running:
        wait_ready(app, timeout=60)
        yield running


def requests_counted(port: int, route: str, status: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=WAIT).text
    wanted = {"route": route, "method": "POST", "status": str(status)}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "metering_http_requests_total" and sample.labels == wanted:
                return float(sample.value)
    return 0.0


def wait_counted(port: int, route: str, status: int, count: float) -> None:
    deadline = time.monotonic() + WAIT
    while (seen := requests_counted(port, route, status)) < count:
        assert time.monotonic() < deadline, f"{route} {status} counted {seen}, not {count}"
        time.sleep(0.05)


def head(route: str, length: int) -> bytes:
    return (
        f"POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("route", ROUTES)
def test_hang_up_mid_body_counts_499_and_logs_no_traceback(
    live: Running, route: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.WARNING)
    before = requests_counted(live.port, route, 499)
    with connect(live.port) as sock:
        sock.sendall(head(route, 100_000) + b'{"scopes": ["re')
    wait_counted(live.port, route, 499, before + 1)
    assert requests_counted(live.port, route, 500) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("route", ROUTES)
def test_stalled_body_is_answered_and_counted_408(live: Running, route: str) -> None:
    before = requests_counted(live.port, route, 408)
    with connect(live.port) as sock:
        sock.sendall(head(route, 100_000) + b'{"scopes": ["re')
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    wait_counted(live.port, route, 408, before + 1)


def test_complete_requests_keep_their_own_status(live: Running) -> None:
    """The marking applies to abandoned requests only: a served request counts as served."""
    before = requests_counted(live.port, "/v1/api-keys", 201)
    response = httpx.post(
        f"http://127.0.0.1:{live.port}/v1/api-keys",
        json={"scopes": ["read"]},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=WAIT,
    )
    assert response.status_code == 201
    wait_counted(live.port, "/v1/api-keys", 201, before + 1)
