"""Real `metering` processes for end-to-end tests: a server that can be killed with
SIGKILL and restarted on the same data dir, one-shot commands, and reading a stopped
server's chDB store from another process (chDB allows one process per data path, and
the test process already has its own path open)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from metering.ingest.spool import Spool

METERING = [sys.executable, "-m", "metering.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_for(data_dir: Path, **extra: str) -> dict[str, str]:
    """The test's environment without its METERING_* variables, on `data_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env.update({"METERING_DATA_DIR": str(data_dir), **extra})
    return env


def run_command(data_dir: Path, *args: str, timeout: float = 120, **extra: str) -> Any:
    """`metering ARGS` to completion (bounded); the CompletedProcess, text mode."""
    return subprocess.run(
        [*METERING, *args],
        env=env_for(data_dir, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ServerProcess:
    """`metering serve` on a fixed data dir and port: restartable, SIGKILL-able. Its
    output goes to a log file next to the data dir (read on failure)."""

    def __init__(self, data_dir: Path, port: int | None = None, **extra: str) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.starts = 0
        self.kills = 0

    def start(self, timeout: float = 120.0) -> None:
        """Start and wait (bounded) until /readyz says 200."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start #{self.starts + 1} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*METERING, "serve", "--port", str(self.port)],
                cwd=self.data_dir.parent,
                env=env_for(self.data_dir, **self.extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"server exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills += 1

    def stop(self, timeout: float = 90.0) -> None:
        """Graceful stop (SIGTERM: the writer drains the spool), bounded."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"server did not stop on SIGTERM:\n{self.log_tail()}") from None

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def metric(self, name: str, labels: dict[str, str]) -> float:
        """One sample of the server's /metrics (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


READ_SCRIPT = """
import json, sys
from metering.clickhouse.client import make_client
c = make_client("chdb://" + sys.argv[1], "default")
table, id_col, stream = sys.argv[3], sys.argv[4], sys.argv[5]
rows, distinct = c.query(f"SELECT count(), uniqExact({id_col}) FROM {table}").result_rows[0]
ids_rows, ids_distinct = c.query(
    "SELECT count(), uniqExact(id) FROM ingested_ids WHERE stream = {s:String}",
    parameters={"s": stream},
).result_rows[0]
ids_final = c.query(
    "SELECT count() FROM ingested_ids FINAL WHERE stream = {s:String}", parameters={"s": stream}
).result_rows[0][0]
with open(sys.argv[2], "w") as out:
    for (item_id,) in c.query(f"SELECT {id_col} FROM {table}").result_rows:
        out.write(item_id + "\\n")
print(json.dumps({"rows": rows, "distinct": distinct, "ids_rows": ids_rows,
                  "ids_distinct": ids_distinct, "ids_final": ids_final}))
"""


def read_store(
    data_dir: Path, ids_file: Path, table: str = "rerank_events", timeout: float = 300
) -> dict[str, int]:
    """Counts of `table` and its ids in `ingested_ids`, read by another process from a
    stopped server's store; the stored ids are written to `ids_file`, one a line."""
    id_col, stream = ("event_id", "events") if table == "rerank_events" else ("probe_id", "probes")
    store = str(data_dir / "clickhouse")
    out = subprocess.run(
        [sys.executable, "-c", READ_SCRIPT, store, str(ids_file), table, id_col, stream],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    counts: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return counts


def spool_tail_items(data_dir: Path, stream: str = "events") -> int:
    """Items in a stopped (or killed) server's spool after its checkpoint: what the next
    start must replay. Read through the spool's own reader, which, like the next start,
    cuts a torn record at the tail."""
    spool = Spool(data_dir / "spool" / stream, max_bytes=1 << 40, fsync=False)
    try:
        total, position = 0, spool.checkpoint
        while records := spool.read(position, max_bytes=64 << 20, max_count=200_000):
            total += sum(record.count for record in records)
            position = records[-1].end
        return total
    finally:
        spool.close()


# A process that spools events and dies before any writer ran: Services opened and
# migrated, the ingest pipeline used through its public API without starting it.
SPOOL_AND_WAIT = """
import sys, time, msgspec
from metering.ingest.decode import Decoded
from metering.ingest.structs import Event
from metering.services import Services
from metering.settings import Settings

events = msgspec.json.decode(sys.stdin.buffer.read())
services = Services.open(Settings(), "unused")
services.migrate()
result = services.events.submit(Decoded([msgspec.convert(e, Event) for e in events], []))
services.events.wait_durable(result)
print("spooled", result.accepted, flush=True)
time.sleep(600)  # killed with SIGKILL by the caller
"""


def spool_then_die(data_dir: Path, events: list[dict[str, Any]], **extra: str) -> int:
    """Spool `events` in a process on `data_dir` that is then killed with SIGKILL before
    any writer stored them; returns how many it had accepted."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SPOOL_AND_WAIT],
        env=env_for(data_dir, METERING_SPOOL_FSYNC="always", **extra),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(json.dumps(events))
        proc.stdin.close()
        line = proc.stdout.readline()  # bounded by the test's timeout
        if not line.startswith("spooled "):
            proc.kill()
            raise AssertionError(f"spooling failed: {line!r} {proc.stderr.read()[-2000:]}")
        return int(line.split()[1])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
