"""The server a bench/ingest.py run measures: a `metering serve` subprocess on a fresh data
dir, the few HTTP calls the bench makes to it, and the /metrics samples it reads.

Plain urllib and subprocess on purpose: the bench must not share code paths (an HTTP
client, settings) with what it measures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Server:
    data_dir: Path
    port: int
    admin_token: str
    extra_env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)  # replaces `metering` when given
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start `metering serve`; return seconds until /readyz said 200."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        env.update(
            METERING_DATA_DIR=str(self.data_dir),
            METERING_ADMIN_TOKEN=self.admin_token,
            METERING_SPOOL_FSYNC="always",
        )
        env.update(self.extra_env)
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        metering = Path(sys.executable).with_name("metering")
        command = [str(metering)] if metering.exists() else [sys.executable, "-m", "metering.cli"]
        command = self.command or command
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, "serve", "--port", str(self.port)],
                cwd=self.data_dir.parent,  # no stray .env from the caller's directory
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, _ = http("GET", f"{self.base}/readyz", timeout=2)
                if status == 200:
                    return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM (graceful: the writer drains the spool), SIGKILL past `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def metric_values(base: str) -> dict[str, float]:
    """The service's Prometheus samples, `name{labels}` -> value."""
    _, text = http("GET", f"{base}/metrics", timeout=10)
    values: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


STORED = 'metering_clickhouse_rows_stored_total{stream="events"}'
SPOOL = 'metering_spool_pending_bytes{stream="events"}'
FAILURES = 'metering_clickhouse_store_failures_total{stream="events"}'
CYCLES = 'metering_clickhouse_store_seconds_count{stream="events"}'
CYCLE_SECONDS = 'metering_clickhouse_store_seconds_sum{stream="events"}'
