"""kill -9 crash test: every acknowledged event is stored exactly once, across crashes.

A real `metering serve` subprocess (chDB + SQLite, METERING_SPOOL_FSYNC=always) takes
≥ 200,000 distinct events from two retrying senders (batches of 1,000-5,000; the same
batch, same event_ids, is resent on any connection error or 5xx until it gets a 202),
while a killer thread `kill -9`s the server at random moments (seeded RNG) and restarts
it on the same data dir. After each restart it resends a random sample of batches that
were already acknowledged: all of their events must come back as duplicates. At the
end the server is stopped and ClickHouse is read from a separate process (chDB: one
process per path): `rerank_events` holds exactly the ids sent, each once, and
`ingested_ids` knows each of them.

Seed: METERING_CRASH_SEED (default 20261127), printed on failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

SEED = int(os.environ.get("METERING_CRASH_SEED", "20261127"))
TOTAL_EVENTS = 200_000
SENDERS = 2
KILLS_WHILE_SENDING = 6
DUPLICATE_SAMPLE = 3  # acknowledged batches resent after each restart
DEADLINE_SECONDS = 420.0
ADMIN_TOKEN = "crash-test-admin-token"
PROVIDERS = ("cohere", "voyage", "jina", "mixedbread")


# ---------------------------------------------------------------------------------------
# The server subprocess.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """`metering serve` on a fixed data dir and port, restartable, kill -9 able."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / "server.log"
        self.starts = 0
        self.kills = 0

    def start(self, timeout: float = 120.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        env.update(
            METERING_DATA_DIR=str(self.data_dir),
            METERING_ADMIN_TOKEN=ADMIN_TOKEN,
            METERING_SPOOL_FSYNC="always",
        )
        metering = Path(sys.executable).with_name("metering")
        command = [str(metering)] if metering.exists() else [sys.executable, "-m", "metering.cli"]
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start #{self.starts + 1} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*command, "serve", "--port", str(self.port)],
                cwd=self.data_dir.parent,
                env=env,
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
                    if client.get(f"{self.base_url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self, timeout: float = 90.0) -> None:
        """Graceful stop (SIGTERM: the writer drains the spool)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop on SIGTERM:\n{self.log_tail()}") from None

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "data", _free_port())
    try:
        yield proc
    finally:
        proc.ensure_dead()


# ---------------------------------------------------------------------------------------
# Batches and the retrying sender.


@dataclass
class Batch:
    number: int
    ids: list[str]
    body: bytes


def make_batches(rng: random.Random, total: int) -> list[Batch]:
    """Distinct events in batches of 1,000-5,000, encoded once (a retry resends the
    very same bytes)."""
    base = datetime.now(UTC) - timedelta(minutes=30)
    batches: list[Batch] = []
    made = 0
    while made < total:
        size = min(rng.randint(1_000, 5_000), total - made)
        if 0 < total - made - size < 1_000:
            size = total - made
        events: list[dict[str, object]] = []
        ids: list[str] = []
        for n in range(made, made + size):
            ids.append(f"crash-{SEED}-{n:07d}")
            tenant = rng.randrange(300)
            events.append(
                {
                    "event_id": ids[-1],
                    "timestamp": (base + timedelta(milliseconds=n)).isoformat(),
                    "tenant_id": f"acct_{tenant:04d}",
                    "project_id": f"proj_{tenant:04d}_{rng.randrange(3)}",
                    "provider": PROVIDERS[n % len(PROVIDERS)],
                    "model": "rerank-4-pro",
                    "status": "ok" if rng.random() < 0.97 else "error",
                    "documents": rng.randint(1, 200),
                    "input_tokens": rng.randint(100, 20_000),
                    "latency_ms": round(rng.uniform(30, 900), 1),
                }
            )
        body = json.dumps({"events": events}, separators=(",", ":")).encode()
        batches.append(Batch(len(batches), ids, body))
        made += size
    return batches


@dataclass
class Progress:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked_events: int = 0
    acked: list[Batch] = field(default_factory=list)
    retries: int = 0
    duplicate_resends: int = 0
    # Retried batches whose earlier attempt had been spooled before the kill (the reply
    # was lost): their events come back as duplicates, not as new.
    spooled_unanswered: int = 0
    # Kills after which the spool held records not yet in ClickHouse (to replay).
    kills_with_spool_tail: int = 0
    errors: list[str] = field(default_factory=list)


class Aborted(Exception):
    """Another thread of the test failed."""


def post_until_202(
    client: httpx.Client,
    url: str,
    batch: Batch,
    progress: Progress,
    deadline: float,
    stop: threading.Event,
) -> dict[str, int]:
    """POST the batch until a 202; retry on connection errors and 5xx only."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    while True:
        if stop.is_set():
            raise Aborted
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch.number} got no 202 before the deadline")
        try:
            response = client.post(url, content=batch.body, headers=headers)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 202:
            reply: dict[str, Any] = response.json()
            if reply["rejected"]:
                raise AssertionError(f"batch {batch.number}: rejected {reply['rejected'][:3]}")
            return {"accepted": int(reply["accepted"]), "duplicates": int(reply["duplicates"])}
        if response is not None and response.status_code < 500:
            raise AssertionError(
                f"batch {batch.number}: HTTP {response.status_code} {response.text[:300]}"
            )
        with progress.lock:
            progress.retries += 1
        time.sleep(0.05)


def sender(
    url: str, queue: list[Batch], progress: Progress, deadline: float, stop: threading.Event
) -> None:
    try:
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=2.0)) as client:
            while not stop.is_set():
                with progress.lock:
                    if not queue:
                        return
                    batch = queue.pop()
                reply = post_until_202(client, url, batch, progress, deadline, stop)
                if reply["accepted"] + reply["duplicates"] != len(batch.ids):
                    raise AssertionError(f"batch {batch.number}: {reply}")
                with progress.lock:
                    progress.spooled_unanswered += reply["duplicates"] > 0
                    progress.acked_events += len(batch.ids)
                    progress.acked.append(batch)
    except Aborted:
        pass
    except BaseException as exc:  # surfaced by the test
        with progress.lock:
            progress.errors.append(f"sender: {type(exc).__name__}: {exc}")
        stop.set()


def resend_acknowledged(
    url: str, rng: random.Random, progress: Progress, deadline: float, stop: threading.Event
) -> None:
    """Resend a random sample of acknowledged batches: every event is a duplicate."""
    with progress.lock:
        sample = rng.sample(progress.acked, min(DUPLICATE_SAMPLE, len(progress.acked)))
    with httpx.Client(timeout=httpx.Timeout(60.0, connect=2.0)) as client:
        for batch in sample:
            reply = post_until_202(client, url, batch, progress, deadline, stop)
            assert reply["accepted"] == 0 and reply["duplicates"] == len(batch.ids), (
                f"acknowledged batch {batch.number} resent: {reply}"
            )
            with progress.lock:
                progress.duplicate_resends += 1


def spool_tail_bytes(data_dir: Path) -> int:
    """Bytes of the event spool after its checkpoint (records a restart must replay)."""
    spool = data_dir / "spool" / "events"
    checkpoint = spool / "checkpoint"
    segment, offset = (
        (int(x) for x in checkpoint.read_text().split()) if checkpoint.exists() else (0, 0)
    )
    total = 0
    for path in spool.glob("seg-*.wal"):
        number = int(path.name[4:16])
        if number == segment:
            total += max(0, path.stat().st_size - offset)
        elif number > segment:
            total += path.stat().st_size
    return total


# ---------------------------------------------------------------------------------------
# Reading ClickHouse from another process.

READ_SCRIPT = """
import json, sys
from metering.clickhouse.client import make_client
c = make_client("chdb://" + sys.argv[1], "default")
rows, distinct = c.query("SELECT count(), uniqExact(event_id) FROM rerank_events").result_rows[0]
ids_rows, ids_distinct = c.query(
    "SELECT count(), uniqExact(id) FROM ingested_ids WHERE stream = 'events'"
).result_rows[0]
ids_final = c.query(
    "SELECT count() FROM ingested_ids FINAL WHERE stream = 'events'"
).result_rows[0][0]
with open(sys.argv[2], "w") as out:
    for (event_id,) in c.query("SELECT event_id FROM rerank_events").result_rows:
        out.write(event_id + "\\n")
print(json.dumps({"rows": rows, "distinct": distinct, "ids_rows": ids_rows,
                  "ids_distinct": ids_distinct, "ids_final": ids_final}))
"""


def read_store(data_dir: Path, ids_file: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", READ_SCRIPT, str(data_dir / "clickhouse"), str(ids_file)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    counts: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return counts


# ---------------------------------------------------------------------------------------
# The test.


@pytest.mark.slow
def test_kill_9_loses_and_duplicates_nothing(server: ServerProcess, tmp_path: Path) -> None:
    started = time.monotonic()
    deadline = started + DEADLINE_SECONDS
    rng = random.Random(SEED)
    batches = make_batches(rng, TOTAL_EVENTS)
    sent_ids = {i for batch in batches for i in batch.ids}
    assert len(sent_ids) == TOTAL_EVENTS
    url = f"{server.base_url}/v1/events"

    server.start()
    progress = Progress()
    queue = list(reversed(batches))
    stop = threading.Event()
    senders = [
        threading.Thread(
            target=sender, args=(url, queue, progress, deadline, stop), name=f"sender-{n}"
        )
        for n in range(SENDERS)
    ]
    for thread in senders:
        thread.start()

    # Kill at random moments while the senders are busy: once the acknowledged count
    # passes each of a few random marks, wait a random 0-300 ms more, then kill -9.
    killer_rng = random.Random(SEED + 1)
    marks = sorted(killer_rng.uniform(0.08, 0.9) * TOTAL_EVENTS for _ in range(KILLS_WHILE_SENDING))
    try:
        for mark in marks:
            while progress.acked_events < mark and not stop.is_set():
                assert time.monotonic() < deadline, "senders made no progress"
                time.sleep(0.005)
            if stop.is_set():
                break
            time.sleep(killer_rng.uniform(0.0, 0.3))
            server.kill9()
            progress.kills_with_spool_tail += spool_tail_bytes(server.data_dir) > 0
            server.start()
            resend_acknowledged(url, killer_rng, progress, deadline, stop)
    except BaseException:
        stop.set()
        raise
    finally:
        for thread in senders:
            thread.join(max(1.0, deadline - time.monotonic()))
    assert not progress.errors, progress.errors
    assert progress.acked_events == TOTAL_EVENTS
    assert server.kills >= 3, f"only {server.kills} kills happened while sending"

    # One more crash with nothing in flight (the writer may still be draining), then
    # the acknowledged batches again, then a graceful stop.
    time.sleep(killer_rng.uniform(0.0, 0.5))
    server.kill9()
    server.start()
    resend_acknowledged(url, killer_rng, progress, deadline, stop)
    server.stop()

    ids_file = tmp_path / "stored_ids.txt"
    counts = read_store(server.data_dir, ids_file)
    stored_ids = ids_file.read_text().split()
    context = (
        f"seed {SEED}, {server.kills} kills, {progress.retries} retries, "
        f"{progress.duplicate_resends} acknowledged batches resent, "
        f"{progress.spooled_unanswered} batches spooled but unanswered at a kill, "
        f"{progress.kills_with_spool_tail} kills with a spool tail to replay, counts {counts}, "
        f"{time.monotonic() - started:.1f}s"
    )
    assert counts["rows"] == counts["distinct"] == TOTAL_EVENTS, context
    assert len(stored_ids) == TOTAL_EVENTS and set(stored_ids) == sent_ids, context
    assert counts["ids_distinct"] == counts["ids_final"] == TOTAL_EVENTS, context
    assert progress.duplicate_resends == DUPLICATE_SAMPLE * (server.kills), context
    print(context)
