"""`metering serve`, `metering migrate` and `metering jobs` as a user runs them: real
subprocesses on a fresh data dir (embedded chDB + SQLite)."""

from __future__ import annotations

import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from metering.scheduler import JOBS
from tests.ingest.helpers import event
from tests.processes import (
    METERING,
    env_for,
    free_port,
    read_store,
    run_command,
    spool_tail_items,
    spool_then_die,
)


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
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.communicate(timeout=10))
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
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=30)
            raise
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
            srv.proc.communicate(timeout=30)


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
        response = httpx.post(f"{first.url}/v1/events", json=batch, headers=headers, timeout=60)
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
        response = httpx.post(f"{second.url}/v1/events", json=batch, headers=headers, timeout=60)
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


class Endpoint(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/up" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoints() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(10)


def test_jobs_list_names_every_job(data_dir: Path) -> None:
    listed = run_command(data_dir, "jobs", "list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == list(JOBS)
    unknown = run_command(data_dir, "jobs", "run", "nope")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        f"metering: no job 'nope'; jobs: {', '.join(JOBS)}"
    ]


def test_jobs_run_stores_probes_once_without_the_ingest_stack(
    data_dir: Path, endpoints: str, tmp_path: Path
) -> None:
    """`jobs run probe` stores its probes exactly once before it exits, and leaves the
    event spool a crashed server left behind alone (no replay: that is serve's work)."""
    events = [event(f"left-{i}") for i in range(200)]
    assert spool_then_die(data_dir, events) == 200
    targets = f"llmapi={endpoints}/up,cohere@eu={endpoints}/down"
    run = run_command(data_dir, "jobs", "run", "probe", METERING_PROBE_TARGETS=targets)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "probe: 2"
    assert spool_tail_items(data_dir, "probes") == 0  # drained by the job
    assert spool_tail_items(data_dir, "events") == 200  # not replayed
    tenants = run_command(data_dir, "jobs", "run", "register-tenants")
    assert tenants.returncode == 0, tenants.stderr
    assert tenants.stdout.splitlines()[-1] == "register-tenants: 0"  # no event stored
    counts = read_store(data_dir, tmp_path / "probes.txt", table="uptime_probes")
    assert counts["rows"] == counts["distinct"] == counts["ids_final"] == 2, counts
    events_counts = read_store(data_dir, tmp_path / "events.txt")
    assert events_counts["rows"] == 0


def test_serve_refuses_an_authorize_port_equal_to_its_own(data_dir: Path) -> None:
    port = free_port()
    result = run_command(
        data_dir, "serve", "--port", str(port), METERING_AUTHORIZE_PORT=str(port), timeout=60
    )
    assert result.returncode == 2
    assert "METERING_AUTHORIZE_PORT: must differ from the main port" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_authorize_slice_the_kernel_would_not_take(data_dir: Path) -> None:
    result = run_command(data_dir, "serve", METERING_AUTHORIZE_SLICE_US="50", timeout=60)
    assert result.returncode == 2
    assert "METERING_AUTHORIZE_SLICE_US" in result.stderr
    assert "0 (the kernel's) or 100-100000 microseconds" in result.stderr
    assert "Traceback" not in result.stderr
