"""The HTTP side of bench/analytics.py: a `metering serve` subprocess on the bench's data dir,
and timing of GET requests over one keep-alive httpx connection, sequentially.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def metering_command() -> list[str]:
    metering = Path(sys.executable).with_name("metering")
    return [str(metering)] if metering.exists() else [sys.executable, "-m", "metering.cli"]


def service_env(data_dir: Path, admin_token: str | None = None) -> dict[str, str]:
    """The caller's environment without METERING_* settings, plus the bench's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env["METERING_DATA_DIR"] = str(data_dir)
    if admin_token is not None:
        env["METERING_ADMIN_TOKEN"] = admin_token
    return env


@dataclass
class Server:
    data_dir: Path
    admin_token: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-serve.log"

    def start(self, timeout: float = 600.0) -> float:
        """Start `metering serve`; seconds until /readyz answered 200."""
        self.port = free_port()
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*metering_command(), "serve", "--port", str(self.port)],
                cwd=self.data_dir.parent,  # no stray .env from the caller's directory
                env=service_env(self.data_dir, self.admin_token),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + timeout
        try:
            with httpx.Client(timeout=2.0) as client:
                while time.perf_counter() < deadline:
                    if self.proc.poll() is not None:
                        code = self.proc.returncode
                        raise RuntimeError(f"server exited {code}: {self.log_tail()}")
                    try:
                        if client.get(f"{self.base}/readyz").status_code == 200:
                            return time.perf_counter() - started
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.1)
            raise TimeoutError(f"server not ready after {timeout:.0f} s: {self.log_tail()}")
        except BaseException:  # also SIGTERM or Ctrl-C while waiting: never leave it running
            self.stop(timeout=30)
            raise

    def settle(self, quiet_s: float = 3.0, timeout: float = 600.0) -> float:
        """Wait until the server has used under 5% of a core for `quiet_s` seconds in a
        row (start-up jobs done: the first invoice run, budgets, forecasts), at most
        `timeout`; seconds waited. Reads are timed in that steady state."""
        assert self.proc is not None
        started = time.perf_counter()
        tick = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

        quiet, last = 0.0, cpu()
        while quiet < quiet_s and time.perf_counter() - started < timeout:
            time.sleep(1.0)
            now = cpu()
            quiet = quiet + 1.0 if now - last < 0.05 else 0.0
            last = now
        return time.perf_counter() - started

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, SIGKILL past `timeout`; waits until the process (and its lock) is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Timed:
    """K sequential calls of one request: latencies (ms), failures and the last good body."""

    times_ms: list[float]
    failures: list[str]
    body: Any


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with 50 values p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def measure(client: httpx.Client, path: str, params: dict[str, str], k: int) -> Timed:
    """One untimed warm-up call, then k timed ones (request sent to body read)."""
    times: list[float] = []
    failures: list[str] = []
    body: Any = None
    for i in range(k + 1):
        started = time.perf_counter()
        response = client.get(path, params=params)
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            failures.append(f"GET {response.url} -> {response.status_code} {response.text[:300]}")
            continue
        body = response.json()
        if i:
            times.append(elapsed)
    return Timed(times, failures, body)
