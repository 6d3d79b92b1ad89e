"""`metering serve` and `metering migrate` as a user runs them: real subprocesses on a
fresh data dir (embedded chDB + SQLite)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ingest.helpers import event

METERING = [sys.executable, "-m", "metering.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_for(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env.update({"METERING_DATA_DIR": str(data_dir), **extra})
    return env


class Server:
    def __init__(self, data_dir: Path, **extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*METERING, "serve", "--port", str(self.port)],
            env=env_for(data_dir, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return out, err


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    srv = Server(data_dir)
    try:
        srv.wait_ready()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.communicate()


def test_serve_answers_health_ready_and_openapi(server: Server, data_dir: Path) -> None:
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready"}
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/events",
        "/v1/probes",
        "/v1/api-keys",
        "/v1/api-keys/{key_id}",
    ):
        assert path in paths, path
    assert "application/x-ndjson" in paths["/v1/events"]["post"]["requestBody"]["content"]
    assert httpx.get(f"{server.url}/", follow_redirects=False).headers["location"] == "/dashboard"
    token_file = data_dir / "admin_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    out, _ = server.stop()
    assert token_file.read_text().strip() in out  # printed once, on first start


def test_second_serve_on_busy_data_dir_fails_with_one_line(server: Server, data_dir: Path) -> None:
    second = subprocess.run(
        [*METERING, "serve", "--port", str(free_port())],
        env=env_for(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert "in use" in lines[0] and "Traceback" not in second.stderr
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # the first one is unharmed


def test_restart_keeps_rows_and_applies_no_migration_twice(data_dir: Path) -> None:
    first = Server(data_dir, METERING_ADMIN_TOKEN="tok")
    headers = {"Authorization": "Bearer tok"}
    batch = {"events": [event(i) for i in range(500)]}
    try:
        first.wait_ready()
        response = httpx.post(f"{first.url}/v1/events", json=batch, headers=headers)
        assert response.json()["accepted"] == 500
    finally:
        out, err = first.stop()
    assert "applied migrations" in err
    again = subprocess.run(
        [*METERING, "migrate"], env=env_for(data_dir), capture_output=True, text=True, timeout=60
    )
    assert again.stdout.splitlines() == ["relational: up to date", "clickhouse: up to date"]
    second = Server(data_dir, METERING_ADMIN_TOKEN="tok")
    try:
        second.wait_ready()
        response = httpx.post(f"{second.url}/v1/events", json=batch, headers=headers)
        assert response.json() == {"accepted": 0, "duplicates": 500, "rejected": []}
    finally:
        out, err = second.stop()
    assert "applied migrations" not in err
    assert "generated admin token" not in out


def test_migrate_dry_run_prints_sql_and_applies_nothing(data_dir: Path) -> None:
    dry = subprocess.run(
        [*METERING, "migrate", "--dry-run"],
        env=env_for(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert "CREATE TABLE IF NOT EXISTS rerank_events" in dry.stdout
    assert "CREATE TABLE tenants" in dry.stdout
    real = subprocess.run(
        [*METERING, "migrate"], env=env_for(data_dir), capture_output=True, text=True, timeout=60
    )
    assert "0001_create_rerank_events" in real.stdout and "relational: 0001" in real.stdout
