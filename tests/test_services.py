"""Start-up while a store is unreachable: the process stays up (/healthz 200), /readyz says
503 and which store, ingest answers 503 with Retry-After, and start-up is retried with
backoff until the store answers."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from metering.app import create_app
from metering.clickhouse.client import make_client
from metering.services import Services
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.processes import METERING, env_for, free_port

WAIT = 60.0  # bound of every wait below


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def readyz_reason(client: TestClient, store: str) -> str | None:
    response = client.get("/readyz")
    assert response.status_code == 503
    reason = response.json().get("reason", "")
    return reason if reason.startswith(f"{store}: ") else None


def post_event(client: TestClient) -> Any:
    return client.post(
        "/v1/events",
        json={"events": []},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )


@pytest.mark.parametrize("store", ["clickhouse", "database"])
def test_an_unreachable_store_at_start_keeps_the_process_up(settings: Settings, store: str) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    if store == "clickhouse":
        update = {"clickhouse_url": f"http://{closed}"}
    else:
        update = {"database_url": f"postgresql+psycopg://postgres@{closed}/metering"}
    app = create_app(settings.model_copy(update=update), ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        reason = wait_for(lambda: readyz_reason(client, store), f"/readyz to name {store}")
        assert "retrying" in reason
        refused = post_event(client)
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        # Reads say the same: 503 with Retry-After in the error shape, never a 500.
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for path in ("/v1/stats", "/v1/providers", "/v1/requests", "/v1/incidents"):
            read = client.get(path, headers=headers)
            assert read.status_code == 503, (path, read.text)
            assert read.headers["retry-after"] and set(read.json()) == {"error", "errors"}
        assert client.get("/healthz").status_code == 200
    # Leaving the block shut the app down: the retry loop gave up at once.


def test_start_is_retried_with_backoff_until_clickhouse_answers(settings: Settings) -> None:
    attempts: list[float] = []
    waiting: list[str | None] = []  # what /readyz would say when each attempt starts
    reason_seen = threading.Event()

    def answers_from_the_third_attempt(url: str, database: str) -> Client:
        attempts.append(time.monotonic())
        waiting.append(services.waiting_for)
        if len(attempts) < 3:
            raise ConnectionError("connection refused (simulated)")
        assert reason_seen.wait(WAIT)  # the test has read the reason meanwhile
        return make_client(url, database)

    services = Services.open(settings, ADMIN_TOKEN, connect=answers_from_the_third_attempt)
    outcome: list[bool] = []
    starter = threading.Thread(
        target=lambda: outcome.append(services.keep_starting(first_delay=0.05, max_delay=0.2))
    )
    try:
        starter.start()
        wait_for(lambda: len(attempts) >= 3, "the third attempt")
        reason = services.waiting_for
        reason_seen.set()
        starter.join(WAIT)
        assert outcome == [True]
        assert reason and reason.startswith("clickhouse: ConnectionError: connection refused")
        assert services.waiting_for is None and services.started
        assert services.events.running and services.probes.running
        assert services.check() == {}
        # Backoff: the delay doubles, and each attempt waited at least its delay (lower
        # bounds only: a loaded machine may wait longer, never shorter).
        assert [w and w.rsplit("(", 1)[1] for w in waiting[1:3]] == [
            "retrying every 0.05 s at most)",
            "retrying every 0.1 s at most)",
        ]
        first_gap, second_gap = attempts[1] - attempts[0], attempts[2] - attempts[1]
        assert first_gap >= 0.05 and second_gap >= 0.1
    finally:
        reason_seen.set()
        services.stop_starting()
        starter.join(WAIT)
        services.close()


def test_stop_starting_ends_the_retries(settings: Settings) -> None:
    def never(url: str, database: str) -> Client:
        raise ConnectionError("connection refused (simulated)")

    services = Services.open(settings, ADMIN_TOKEN, connect=never)
    outcome: list[bool] = []
    starter = threading.Thread(target=lambda: outcome.append(services.keep_starting(10.0, 30.0)))
    starter.start()
    wait_for(lambda: services.waiting_for, "the first failed attempt")
    services.stop_starting()
    starter.join(WAIT)
    assert not starter.is_alive() and outcome == [False]
    services.close()


def test_a_bad_clickhouse_url_fails_at_once(settings: Settings) -> None:
    with pytest.raises(ValueError, match="unsupported scheme"):
        Services.open(settings.model_copy(update={"clickhouse_url": "ftp://x"}), ADMIN_TOKEN)


def test_serve_stays_up_while_clickhouse_is_unreachable(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*METERING, "serve", "--port", str(port)],
            env=env_for(
                tmp_path / "data",
                METERING_CLICKHOUSE_URL=f"http://127.0.0.1:{free_port()}",
                METERING_ADMIN_TOKEN=ADMIN_TOKEN,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with httpx.Client(timeout=5.0) as http:

            def reason() -> str | None:
                if proc.poll() is not None:
                    raise AssertionError(f"serve exited: {log_path.read_text()[-2000:]}")
                try:
                    ready = http.get(f"{url}/readyz")
                except httpx.TransportError:
                    return None
                assert ready.status_code == 503
                text: str = ready.json().get("reason", "")
                return text if text.startswith("clickhouse: ") else None

            wait_for(reason, "serve to say clickhouse is unreachable")
            time.sleep(1.5)  # past the first retry: still up
            assert proc.poll() is None, log_path.read_text()[-2000:]
            assert http.get(f"{url}/healthz").status_code == 200
            assert wait_for(reason, "the reason again", timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
