"""kill -9 crash test: every acknowledged event is stored exactly once, across crashes.

A real `metering serve` subprocess (chDB + SQLite, METERING_SPOOL_FSYNC=always) takes
≥ 200,000 distinct events from two paced, retrying senders (batches of 1,000-5,000; the same
batch, same event_ids, is resent on any connection error or 5xx until it gets a 202),
while a killer thread `kill -9`s the server at random moments (seeded RNG) and restarts
it on the same data dir. Each kill waits (bounded) until the server reports spooled
bytes not yet in ClickHouse, so kills land while the writer lags; after each kill the
dead server's spool tail is counted, and the restarted server must report in /metrics
that it replayed exactly that many events before it took traffic (at least one kill
must have left a tail). After each restart it resends a random sample of batches that
were already acknowledged: all of their events must come back as duplicates. At the
end the server is stopped and ClickHouse is read from a separate process (chDB: one
process per path): `rerank_events` holds exactly the ids sent, each once, and
`ingested_ids` knows each of them.

`test_kill_9_with_a_spool_tail_replays_it_once` is the deterministic part: a process
spools events with no writer running and is killed with SIGKILL; the next server
replays exactly those events, once.

Seed: METERING_CRASH_SEED (default 20261127), printed on failure.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ingest.helpers import event
from tests.processes import ServerProcess, read_store, spool_tail_items, spool_then_die

SEED = int(os.environ.get("METERING_CRASH_SEED", "20261127"))
TOTAL_EVENTS = 200_000
SENDERS = 2
KILLS_WHILE_SENDING = 6
DUPLICATE_SAMPLE = 3  # acknowledged batches resent after each restart
SENDER_RATE = 8_000  # events/s per sender at most (unpaced, 200k go by in 2-3 s)
DEADLINE_SECONDS = 420.0
ADMIN_TOKEN = "crash-test-admin-token"
PROVIDERS = ("cohere", "voyage", "jina", "mixedbread")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path / "data",
        METERING_ADMIN_TOKEN=ADMIN_TOKEN,
        METERING_SPOOL_FSYNC="always",
    )
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
    # Kills after which the spool held records not yet in ClickHouse (to replay), and
    # the events the restarted servers replayed from them.
    kills_with_spool_tail: int = 0
    replayed: int = 0
    tails: list[tuple[int, bool, int]] = field(default_factory=list)  # acked, lagging, tail
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
                started = time.monotonic()
                reply = post_until_202(client, url, batch, progress, deadline, stop)
                # Paced, so that the kills (at marks of the acknowledged count) fall while
                # events are being sent, not after the last one.
                stop.wait(max(0.0, len(batch.ids) / SENDER_RATE - (time.monotonic() - started)))
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


def replayed_at_start(server: ServerProcess) -> int:
    return int(server.metric("metering_spool_replayed_items_total", {"stream": "events"}))


def kill_while_the_writer_lags(server: ServerProcess, progress: Progress, wait: float) -> None:
    """SIGKILL as soon as the server reports spooled bytes not yet stored (or after
    `wait` seconds), then count the tail it left and check that the restarted server
    replayed exactly that many events before it took traffic."""
    # Polled back to back: the writer stores a batch within milliseconds of its spool
    # write, so the windows with a tail are short but recur with every request.
    deadline = time.monotonic() + wait
    lagging = False
    while not lagging and time.monotonic() < deadline:
        try:
            lagging = server.metric("metering_spool_pending_bytes", {"stream": "events"}) > 0
        except httpx.TransportError:
            break
    server.kill9()
    tail = spool_tail_items(server.data_dir)
    progress.tails.append((progress.acked_events, lagging, tail))
    server.start()
    replayed = replayed_at_start(server)
    assert replayed == tail, f"the restart replayed {replayed} events, the spool held {tail}"
    with progress.lock:
        progress.kills_with_spool_tail += tail > 0
        progress.replayed += replayed


# ---------------------------------------------------------------------------------------
# The test.


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE_SECONDS + 300)
def test_kill_9_loses_and_duplicates_nothing(server: ServerProcess, tmp_path: Path) -> None:
    started = time.monotonic()
    deadline = started + DEADLINE_SECONDS
    rng = random.Random(SEED)
    batches = make_batches(rng, TOTAL_EVENTS)
    sent_ids = {i for batch in batches for i in batch.ids}
    assert len(sent_ids) == TOTAL_EVENTS
    url = f"{server.url}/v1/events"

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
            kill_while_the_writer_lags(server, progress, wait=0.3)
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
    kill_while_the_writer_lags(server, progress, wait=0.0)
    resend_acknowledged(url, killer_rng, progress, deadline, stop)
    server.stop()

    ids_file = tmp_path / "stored_ids.txt"
    counts = read_store(server.data_dir, ids_file)
    stored_ids = ids_file.read_text().split()
    context = (
        f"seed {SEED}, {server.kills} kills, {progress.retries} retries, "
        f"{progress.duplicate_resends} acknowledged batches resent, "
        f"{progress.spooled_unanswered} batches spooled but unanswered at a kill, "
        f"{progress.kills_with_spool_tail} kills with a spool tail to replay "
        f"({progress.replayed} events replayed; per kill (acked, lagging, tail) "
        f"{progress.tails}), counts {counts}, "
        f"{time.monotonic() - started:.1f}s"
    )
    assert counts["rows"] == counts["distinct"] == TOTAL_EVENTS, context
    assert len(stored_ids) == TOTAL_EVENTS and set(stored_ids) == sent_ids, context
    assert counts["ids_distinct"] == counts["ids_final"] == TOTAL_EVENTS, context
    assert progress.duplicate_resends == DUPLICATE_SAMPLE * (server.kills), context
    assert progress.kills_with_spool_tail >= 1 and progress.replayed > 0, context
    print(context)


def test_kill_9_with_a_spool_tail_replays_it_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    events = [event(f"tail-{i}") for i in range(1000)]
    assert spool_then_die(data_dir, events, METERING_ADMIN_TOKEN=ADMIN_TOKEN) == 1000
    assert spool_tail_items(data_dir) == 1000

    server = ServerProcess(data_dir, METERING_ADMIN_TOKEN=ADMIN_TOKEN)
    try:
        server.start()
        assert replayed_at_start(server) == 1000
        response = httpx.post(
            f"{server.url}/v1/events",
            json={"events": events},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=60,
        )
        assert response.json() == {"accepted": 0, "duplicates": 1000, "rejected": []}
        server.stop()
    finally:
        server.ensure_dead()
    assert spool_tail_items(data_dir) == 0
    counts = read_store(data_dir, tmp_path / "ids.txt")
    assert counts["rows"] == counts["distinct"] == counts["ids_final"] == 1000, counts
    assert set((tmp_path / "ids.txt").read_text().split()) == {e["event_id"] for e in events}
