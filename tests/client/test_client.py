"""End-to-end tests of metering.client against a real HTTP server on 127.0.0.1.

The fake server speaks the /v1/events and /v1/probes protocol, deduplicates by id like the
real one, and can be told to misbehave (drop connections, 503 + Retry-After, 429, stall past
the client timeout, 413 above a size, forced statuses, per-event rejections, a closed gate).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from metering.client import AsyncMeteringClient, DeadLetter, MeteringClient

API_KEY = "test-key"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Fast retry settings for every test client.
FAST: dict[str, Any] = {"backoff_base": 0.005, "backoff_max": 0.03, "timeout": 2.0}


@dataclass
class Chaos:
    """Probabilities of misbehaviour per request (checked in this order)."""

    drop_before_store: float = 0.0  # read the request, close the socket, store nothing
    drop_after_store: float = 0.0  # store, then close the socket without answering
    p503: float = 0.0
    p429: float = 0.0
    stall: float = 0.0  # sleep stall_seconds, then store and answer (client has given up)
    stall_seconds: float = 0.5
    retry_after: str | None = "0"


@dataclass
class Request:
    path: str
    ids: list[str]
    body_len: int
    status: int | None  # None: connection dropped
    at: float


@dataclass
class ServerState:
    chaos: Chaos = field(default_factory=Chaos)
    max_records: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    forced: list[int] = field(default_factory=list)  # statuses for the next requests
    status_for: Callable[[list[str]], int | None] = lambda ids: None  # per-request override
    reject: Callable[[dict[str, Any]], list[str] | None] = lambda rec: None
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: random.Random = field(default_factory=lambda: random.Random(1234))
    stored: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {"/v1/events": {}, "/v1/probes": {}}
    )
    order: dict[str, list[str]] = field(
        default_factory=lambda: {"/v1/events": [], "/v1/probes": []}
    )
    accepted: int = 0
    duplicates: int = 0
    mismatched_duplicates: int = 0
    bad_content_type: int = 0
    requests: list[Request] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any] | None, headers: dict[str, str]) -> None:
        raw = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_POST(self) -> None:
        st = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        st.gate.wait(timeout=30)
        now = time.monotonic()
        key_field = {"/v1/events": "event_id", "/v1/probes": "probe_id"}.get(self.path)
        list_field = self.path.rsplit("/", 1)[-1]
        try:
            records = json.loads(body)[list_field] if key_field else None
        except (ValueError, KeyError, TypeError):
            records = None
        ids = [r.get(key_field) for r in records] if records and key_field else []

        def log(status: int | None) -> None:
            with st.lock:
                st.requests.append(Request(self.path, ids, len(body), status, now))

        if key_field is None:
            log(404)
            return self._answer(404, {"error": "not found"}, {})
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            log(401)
            return self._answer(401, {"error": "bad key"}, {})
        if self.headers.get("Content-Type") != "application/json":
            with st.lock:
                st.bad_content_type += 1
        if records is None or not isinstance(records, list):
            log(400)
            return self._answer(400, {"error": "body is not JSON"}, {})
        with st.lock:
            forced = st.forced.pop(0) if st.forced else st.status_for(ids)
            roll = st.rng.random()
        if forced is not None:
            log(forced)
            return self._answer(forced, {"error": "forced"}, {})
        if len(records) > st.max_records or len(body) > st.max_bytes:
            log(413)
            return self._answer(413, {"error": "too large"}, {})
        c = st.chaos
        edges = [c.drop_before_store, c.drop_after_store, c.p503, c.p429, c.stall]
        acc = 0.0
        action = "ok"
        for name, p in zip(
            ["drop_before", "drop_after", "503", "429", "stall"], edges, strict=True
        ):
            acc += p
            if roll < acc:
                action = name
                break
        with st.lock:
            st.actions[action] += 1
        if action == "drop_before":
            log(None)
            return self._drop()
        if action in ("503", "429"):
            log(int(action))
            headers = {"Retry-After": c.retry_after} if c.retry_after is not None else {}
            return self._answer(int(action), {"error": "busy"}, headers)
        if action == "stall":
            time.sleep(c.stall_seconds)
        result = self._store(records, key_field)
        if action == "drop_after":
            log(None)
            return self._drop()
        log(202)
        with contextlib.suppress(OSError):  # a stalled client may be gone
            self._answer(202, result, {})

    def _store(self, records: list[dict[str, Any]], key_field: str) -> dict[str, Any]:
        st = self.server.state
        accepted = duplicates = 0
        rejected: list[dict[str, Any]] = []
        with st.lock:
            table = st.stored[self.path]
            for i, rec in enumerate(records):
                errors = st.reject(rec)
                if errors:
                    rejected.append({"index": i, key_field: rec.get(key_field), "errors": errors})
                    continue
                key = rec[key_field]
                if key in table:
                    duplicates += 1
                    if table[key] != rec:
                        st.mismatched_duplicates += 1
                else:
                    table[key] = rec
                    st.order[self.path].append(key)
                    accepted += 1
            st.accepted += accepted
            st.duplicates += duplicates
        return {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # stalled handlers write to sockets the client already closed


class FakeMeteringServer:
    def __init__(self) -> None:
        self.state = ServerState()
        self.state.gate.set()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = self.state
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.state.gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def event_ids(self) -> list[str]:
        with self.state.lock:
            return list(self.state.order["/v1/events"])

    def requests(self, status: int | str | None = "any") -> list[Request]:
        with self.state.lock:
            return [r for r in self.state.requests if status == "any" or r.status == status]


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A broken client must fail the run, not hang it (close() retries forever by design)."""
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def server() -> Iterator[FakeMeteringServer]:
    srv = FakeMeteringServer()
    yield srv
    srv.stop()


ClientFactory = Callable[..., MeteringClient]


@pytest.fixture
def make_client(server: FakeMeteringServer) -> Iterator[ClientFactory]:
    """MeteringClient against ``server`` with fast retries; closed (bounded) after the test."""
    made: list[MeteringClient] = []

    def make(**kw: Any) -> MeteringClient:
        opts = {**FAST, **kw}
        url, key = opts.pop("url", server.url), opts.pop("api_key", API_KEY)
        client = MeteringClient(url, key, **opts)
        made.append(client)
        return client

    yield make
    server.state.gate.set()
    for client in made:
        client.close(timeout=2)


@contextlib.asynccontextmanager
async def async_client(server: FakeMeteringServer, **kw: Any) -> AsyncIterator[AsyncMeteringClient]:
    client = AsyncMeteringClient(server.url, API_KEY, **{**FAST, **kw})
    try:
        yield client
    finally:
        server.state.gate.set()
        await client.aclose(timeout=2)


def make_event(i: int, prefix: str = "ev", **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"{prefix}-{i:06d}",
        "timestamp": "2025-01-01T00:00:00+00:00",
        "tenant_id": "tenant-1",
        "project_id": "project-1",
        "provider": "cohere",
        "model": "rerank-v3.5",
        "status": "ok",
        "documents": 10,
        "input_tokens": 100 + i,
        "latency_ms": 12.5,
    }
    event.update(extra)
    return event


def ids(start: int, stop: int, prefix: str = "ev") -> list[str]:
    return [f"{prefix}-{i:06d}" for i in range(start, stop)]


def events(start: int, stop: int) -> list[dict[str, Any]]:
    return [make_event(i) for i in range(start, stop)]


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def spill_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".ndjson")


CHAOS = Chaos(
    drop_before_store=0.1,
    drop_after_store=0.1,
    p503=0.12,
    p429=0.05,
    stall=0.04,
    stall_seconds=0.5,
    retry_after="0",
)
ALL_ACTIONS = {"ok", "drop_before", "drop_after", "503", "429", "stall"}


# ---------------------------------------------------------------------------------------------
# 1. Exactly-once through a hostile server
# ---------------------------------------------------------------------------------------------


def test_sync_client_delivers_every_event_exactly_once_through_chaos(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    server.state.chaos = CHAOS
    n_threads, per_thread = 4, 5_000
    dead: list[DeadLetter] = []
    client = make_client(max_batch=250, flush_interval=0.05, on_error=dead.append, timeout=0.25)

    def producer(t: int) -> None:
        evs = [make_event(i, prefix=f"t{t}") for i in range(per_thread)]
        for start in range(0, per_thread, 250):
            client.send_many(evs[start : start + 125])
            for ev in evs[start + 125 : start + 250]:
                client.send(ev)

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
        assert not th.is_alive()
    assert client.flush(timeout=40)
    assert client.close(timeout=5)

    sent = {f"t{t}-{i:06d}" for t in range(n_threads) for i in range(per_thread)}
    got = server.event_ids()
    assert len(got) == len(sent) == n_threads * per_thread  # nothing stored twice
    assert set(got) == sent  # nothing lost
    for t in range(n_threads):  # each producer's events were stored in its sending order
        assert [e for e in got if e.startswith(f"t{t}-")] == ids(0, per_thread, f"t{t}")
    st = server.state
    assert dead == []
    assert st.mismatched_duplicates == 0  # retries resend identical records
    assert st.bad_content_type == 0
    # >= 80 requests with a seeded server RNG: every kind of misbehaviour really happened.
    assert set(st.actions) == ALL_ACTIONS
    assert st.duplicates > 0  # answers lost after storing forced resends the server deduped
    stats = client.stats()
    assert stats["retries"] >= len(server.requests(None)) + len(server.requests(503))
    assert stats["sent"] == len(sent)
    assert stats["pending"] == 0
    # Answers lost to dropped/stalled requests mean the client may see fewer duplicates than
    # the server counted; it can never see more accepted ones.
    assert stats["accepted"] + stats["duplicates"] >= len(sent)
    assert stats["accepted"] <= st.accepted
    assert all(len(r.ids) <= 250 for r in server.requests())


def test_async_client_delivers_every_event_exactly_once_through_chaos(
    server: FakeMeteringServer,
) -> None:
    server.state.chaos = CHAOS
    n_tasks, per_task = 4, 5_000
    dead: list[DeadLetter] = []

    async def main() -> dict[str, int]:
        async with async_client(
            server, max_batch=250, flush_interval=0.05, on_error=dead.append, timeout=0.25
        ) as client:

            async def producer(t: int) -> None:
                for i in range(per_task):
                    await client.send(make_event(i, prefix=f"a{t}"))
                    if i % 500 == 0:
                        await asyncio.sleep(0)

            await asyncio.gather(*(producer(t) for t in range(n_tasks)))
            assert await client.flush(timeout=40)
            assert await client.aclose()
            return client.stats()

    stats = asyncio.run(main())
    sent = {f"a{t}-{i:06d}" for t in range(n_tasks) for i in range(per_task)}
    got = server.event_ids()
    assert len(got) == len(sent)
    assert set(got) == sent
    for t in range(n_tasks):
        assert [e for e in got if e.startswith(f"a{t}-")] == ids(0, per_task, f"a{t}")
    assert dead == []
    assert server.state.mismatched_duplicates == 0
    assert server.state.duplicates > 0
    assert set(server.state.actions) == ALL_ACTIONS
    assert stats["sent"] == len(sent) and stats["pending"] == 0
    assert stats["retries"] > 0


def test_retry_after_is_honoured_and_same_batch_is_resent(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    server.state.chaos = Chaos(p503=1.0, retry_after="1")
    client = make_client(max_batch=10)
    client.send_many(events(0, 10))
    assert wait_until(lambda: len(server.requests(503)) >= 1)
    server.state.chaos = Chaos()
    assert client.flush(timeout=10)
    reqs = server.requests()
    assert [r.status for r in reqs] == [503, 202]
    assert reqs[1].at - reqs[0].at >= 0.95  # waited for Retry-After: 1, not backoff_max
    assert reqs[0].ids == reqs[1].ids == ids(0, 10)
    assert client.stats()["retries"] == 1


def test_max_retries_dead_letters_instead_of_dropping(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    server.state.chaos = Chaos(p503=1.0)
    dead: list[DeadLetter] = []
    client = make_client(max_retries=2, on_error=dead.append)
    client.send_many(events(0, 3))
    assert client.flush(timeout=10)
    assert len(server.requests(503)) == 3
    assert [d.reason for d in dead] == ["retries_exhausted"]
    assert [r["event_id"] for r in dead[0].records] == ids(0, 3)
    assert client.stats()["dead_lettered"] == 3


# ---------------------------------------------------------------------------------------------
# 2. Full buffer: block / spill / leftovers from a crash
# ---------------------------------------------------------------------------------------------


def test_full_buffer_blocks_send_until_space_frees(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    server.state.gate.clear()  # the server reads requests but does not answer yet
    client = make_client(max_batch=10, max_buffer=50, flush_interval=0.01)
    client.send_many(events(0, 50))
    done = threading.Event()

    entered = threading.Event()

    def late_sender() -> None:
        entered.set()
        client.send(make_event(50))
        done.set()

    th = threading.Thread(target=late_sender, daemon=True)
    th.start()
    assert entered.wait(5)
    assert not done.wait(0.5), "send() should block while 50 events are unacknowledged"
    assert client.stats()["buffered"] == 50
    assert client.flush(timeout=0.1) is False
    server.state.gate.set()
    assert done.wait(5)
    assert client.close(timeout=5)
    assert server.event_ids() == ids(0, 51)
    assert client.stats()["spilled"] == 0


def test_async_full_buffer_blocks_send_until_space_frees(server: FakeMeteringServer) -> None:
    server.state.gate.clear()

    async def main() -> None:
        async with async_client(server, max_batch=10, max_buffer=50, flush_interval=0.01) as c:
            await c.send_many(events(0, 50))
            late = asyncio.create_task(c.send(make_event(50)))
            await asyncio.sleep(0.5)
            assert not late.done()
            assert await c.flush(timeout=0.1) is False
            server.state.gate.set()
            await asyncio.wait_for(late, 5)
            assert await c.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert server.event_ids() == ids(0, 51)


def test_full_buffer_spills_to_disk_then_sends_and_deletes(
    server: FakeMeteringServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    server.state.gate.clear()
    client = make_client(
        max_batch=10, max_buffer=20, flush_interval=0.01, on_full="spill", spill_dir=tmp_path
    )

    def produce() -> None:
        client.send_many(events(0, 60))
        for i in range(60, 100):
            client.send(make_event(i))

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    producer.join(10)
    assert not producer.is_alive(), "send() must not block with on_full='spill'"
    files = spill_files(tmp_path)
    lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    assert len(files) == 8  # one file per would-be batch
    assert [e["event_id"] for e in lines] == ids(20, 100)
    assert client.stats()["spilled"] == 80
    server.state.gate.set()
    assert client.flush(timeout=10)
    assert spill_files(tmp_path) == []
    assert client.close(timeout=5)
    assert server.event_ids() == ids(0, 100)  # arrival order survives the detour via disk
    assert client.stats()["accepted"] == 100


def test_events_sent_while_spill_files_are_pending_queue_behind_them(
    server: FakeMeteringServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    blocked = {"on": True}
    server.state.status_for = lambda ids: 503 if blocked["on"] and "ev-000010" in ids else None
    client = make_client(
        max_batch=10, max_buffer=10, flush_interval=0.01, on_full="spill", spill_dir=tmp_path
    )
    client.send_many(events(0, 30))  # 10 in memory, 20 spilled
    assert wait_until(lambda: len(server.requests(503)) >= 2)  # first spill batch failing
    assert server.event_ids() == ids(0, 10)
    assert client.stats()["buffered"] == 0  # memory has room again...
    client.send_many(events(30, 40))  # ...but these are newer than the spilled ones
    assert client.stats()["spilled"] == 30
    blocked["on"] = False
    assert client.flush(timeout=10)
    assert server.event_ids() == ids(0, 40)
    assert spill_files(tmp_path) == []


def test_spill_file_is_kept_until_its_batch_is_acknowledged(
    server: FakeMeteringServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    blocked = {"on": True}
    server.state.status_for = lambda ids: 503 if blocked["on"] and "ev-000010" in ids else None
    client = make_client(
        max_batch=10, max_buffer=10, flush_interval=0.01, on_full="spill", spill_dir=tmp_path
    )
    client.send_many(events(0, 30))
    files = spill_files(tmp_path)
    assert len(files) == 2
    assert wait_until(lambda: len(server.requests(503)) >= 3)
    assert server.event_ids() == ids(0, 10)
    assert spill_files(tmp_path) == files  # in flight but not acknowledged: still on disk
    assert client.close(timeout=0.2) is False  # give up; the files stay for the next run
    assert spill_files(tmp_path) == files
    blocked["on"] = False
    again = make_client(spill_dir=tmp_path)
    assert again.stats()["recovered"] == 20
    assert again.flush(timeout=10)
    assert server.event_ids() == ids(0, 30)
    assert spill_files(tmp_path) == []


def test_close_timeout_keeps_arrival_order_across_spill_file_and_memory(
    server: FakeMeteringServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    blocked = {"on": True}
    server.state.status_for = lambda ids: 503 if blocked["on"] and "ev-000010" in ids else None
    client = make_client(
        max_batch=10, max_buffer=10, flush_interval=0.01, on_full="spill", spill_dir=tmp_path
    )
    client.send_many(events(0, 20))  # 0-9 in memory, 10-19 spilled
    assert wait_until(lambda: len(server.requests(503)) >= 2)  # the spill file is in flight
    client.send_many(events(20, 25))  # nothing left to queue behind: back to memory
    assert client.stats()["spilled"] == 10
    assert client.close(timeout=0.2) is False  # 20-24 must be persisted after 10-19
    blocked["on"] = False
    again = make_client(spill_dir=tmp_path)
    assert again.flush(timeout=10)
    assert server.event_ids() == ids(0, 25)
    assert spill_files(tmp_path) == []


def test_async_spill(server: FakeMeteringServer, tmp_path: Path) -> None:
    server.state.gate.clear()

    async def main() -> None:
        async with async_client(
            server,
            max_batch=10,
            max_buffer=20,
            flush_interval=0.01,
            on_full="spill",
            spill_dir=tmp_path,
        ) as client:
            await client.send_many(events(0, 45))
            assert len(spill_files(tmp_path)) == 3
            assert client.stats()["spilled"] == 25
            server.state.gate.set()
            assert await client.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert spill_files(tmp_path) == []
    assert server.event_ids() == ids(0, 45)


CRASHER = textwrap.dedent(
    """
    import os, sys
    from metering.client import MeteringClient
    url, spill_dir = sys.argv[1], sys.argv[2]
    c = MeteringClient(url, "test-key", max_batch=10, max_buffer=20, flush_interval=0.01,
                       on_full="spill", spill_dir=spill_dir, backoff_base=0.01,
                       backoff_max=0.05, timeout=1.0)
    for i in range(100):
        c.send({"event_id": f"ev-{i:06d}", "timestamp": "2025-01-01T00:00:00Z",
                "tenant_id": "t", "project_id": "p", "provider": "x", "model": "m",
                "status": "ok", "documents": 1, "input_tokens": 1, "latency_ms": 1})
    os._exit(0)  # crash: no close(), no flush
    """
)


def test_new_client_resends_spill_files_left_by_a_crashed_process(
    server: FakeMeteringServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nobody listens on: every attempt is refused
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(
        [sys.executable, "-c", CRASHER, dead_url, str(tmp_path)], env=env, check=True, timeout=30
    )
    assert len(spill_files(tmp_path)) == 8
    # A torn line, as a crash in the middle of a write would leave it.
    with (spill_files(tmp_path)[-1]).open("ab") as f:
        f.write(b'{"event_id": "ev-torn", "timest')

    dead: list[DeadLetter] = []
    client = make_client(spill_dir=tmp_path, on_error=dead.append)
    assert client.stats()["recovered"] == 81
    assert client.flush(timeout=10)  # no send(): the leftovers alone are delivered
    # The 20 events only in memory died with the process; the 80 on disk are delivered.
    assert server.event_ids() == ids(20, 100)
    assert spill_files(tmp_path) == []
    assert [d.reason for d in dead] == ["corrupt_spill"]
    assert "ev-torn" in dead[0].detail


def test_close_timeout_persists_undelivered_events_for_next_client(
    server: FakeMeteringServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    server.state.chaos = Chaos(p503=1.0)
    client = make_client(max_batch=5, spill_dir=tmp_path)
    client.send_many(events(0, 12))
    assert client.close(timeout=0.3) is False
    assert sum(len(f.read_text().splitlines()) for f in spill_files(tmp_path)) == 12
    server.state.chaos = Chaos()
    again = make_client(spill_dir=tmp_path)
    assert again.flush(timeout=10)
    assert server.event_ids() == ids(0, 12)
    assert spill_files(tmp_path) == []


def test_spill_dir_is_owned_by_one_live_client(make_client: ClientFactory, tmp_path: Path) -> None:
    first = make_client(on_full="spill", spill_dir=tmp_path)
    with pytest.raises(RuntimeError, match="in use"):
        make_client(on_full="spill", spill_dir=tmp_path)
    assert first.close(timeout=5)
    make_client(on_full="spill", spill_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. 413 splitting, 400/401 dead letters, per-event rejections
# ---------------------------------------------------------------------------------------------


def test_413_splits_batches_until_they_fit(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    server.state.max_records = 7
    dead: list[DeadLetter] = []
    client = make_client(max_batch=50, on_error=dead.append)
    client.send_many(events(0, 50))
    assert client.flush(timeout=10)
    assert server.event_ids() == ids(0, 50)
    ok = server.requests(202)
    assert all(len(r.ids) <= 7 for r in ok)
    assert sum(len(r.ids) for r in ok) == 50  # no event sent twice after splitting
    assert [len(r.ids) for r in server.requests(413)][:3] == [50, 25, 12]
    assert dead == []


def test_413_on_a_single_event_is_dead_lettered(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    server.state.max_bytes = 600
    dead: list[DeadLetter] = []
    client = make_client(on_error=dead.append)
    client.send(make_event(0, model="x" * 1000))
    client.send(make_event(1))
    assert client.flush(timeout=10)
    assert server.event_ids() == ["ev-000001"]
    assert [(d.reason, d.status) for d in dead] == [("too_large", 413)]
    assert dead[0].records[0]["event_id"] == "ev-000000"


def test_batches_respect_max_batch_bytes(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    client = make_client(max_batch=1000, max_batch_bytes=4096)
    client.send_many(events(0, 300))
    assert client.flush(timeout=10)
    reqs = server.requests(202)
    assert len(reqs) > 1 and all(r.body_len <= 4096 for r in reqs)
    assert server.event_ids() == ids(0, 300)


def test_400_sends_the_batch_to_on_error_and_carries_on(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    server.state.forced = [400]
    dead: list[DeadLetter] = []
    client = make_client(max_batch=5, on_error=dead.append)
    client.send_many(events(0, 5))
    assert client.flush(timeout=10)
    client.send_many(events(5, 10))
    assert client.flush(timeout=10)
    assert len(dead) == 1
    assert (dead[0].reason, dead[0].status, dead[0].kind) == ("http_400", 400, "events")
    assert dead[0].records == events(0, 5)
    assert server.event_ids() == ids(5, 10)
    assert len(server.requests(400)) == 1  # not retried
    assert client.stats()["dead_lettered"] == 5


def test_wrong_api_key_is_dead_lettered_not_retried(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    dead: list[DeadLetter] = []
    client = make_client(api_key="wrong", on_error=dead.append)
    client.send(make_event(0))
    assert client.flush(timeout=10)
    assert [(d.reason, len(d.records)) for d in dead] == [("http_401", 1)]
    assert len(server.requests()) == 1


def test_rejected_events_reach_on_error_with_server_messages(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    server.state.reject = lambda rec: (
        ["documents: must be >= 0"] if rec.get("documents", 0) < 0 else None
    )
    dead: list[DeadLetter] = []
    client = make_client(max_batch=8, on_error=dead.append)
    client.send_many([make_event(i, documents=-1 if i % 4 == 0 else 3) for i in range(20)])
    assert client.flush(timeout=10)
    rejected = [rec for d in dead for rec in d.records]
    assert {d.reason for d in dead} == {"rejected"}
    assert [r["event_id"] for r in rejected] == [f"ev-{i:06d}" for i in range(0, 20, 4)]
    assert all(errs == ["documents: must be >= 0"] for d in dead for errs in d.errors)
    assert server.event_ids() == [f"ev-{i:06d}" for i in range(20) if i % 4]
    stats = client.stats()
    assert (stats["accepted"], stats["rejected"]) == (15, 5)
    assert len(server.requests()) == 3  # rejections are not retried


def test_on_error_callback_failure_does_not_kill_the_worker(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    server.state.forced = [403]

    def broken(_: DeadLetter) -> None:
        raise ValueError("boom")

    client = make_client(max_batch=1, on_error=broken)
    client.send(make_event(0))
    client.send(make_event(1))
    assert client.flush(timeout=10)
    assert server.event_ids() == ["ev-000001"]


# ---------------------------------------------------------------------------------------------
# 4. close() flushes, age-based flush, probes, input validation
# ---------------------------------------------------------------------------------------------


def test_close_flushes_partial_batch(server: FakeMeteringServer) -> None:
    # An hour's age limit: the batch can only have been sent by close().
    with MeteringClient(server.url, API_KEY, max_batch=100, flush_interval=3600, **FAST) as c:
        c.send_many(events(0, 7))
        time.sleep(0.2)
        assert server.requests() == []  # neither full nor old: nothing sent yet
    assert server.event_ids() == ids(0, 7)
    with pytest.raises(RuntimeError, match="closed"):
        c.send(make_event(99))


def test_partial_batch_is_sent_once_it_is_old_enough(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    client = make_client(max_batch=100, flush_interval=0.3)
    t0 = time.monotonic()
    client.send_many(events(0, 3))
    assert wait_until(lambda: len(server.event_ids()) == 3, timeout=5)
    reqs = server.requests()
    assert len(reqs) == 1 and reqs[0].at - t0 >= 0.25


def test_async_close_flushes_and_age_flush(server: FakeMeteringServer) -> None:
    async def main() -> None:
        async with async_client(server, max_batch=100, flush_interval=0.3) as client:
            t0 = time.monotonic()
            await client.send_many(events(0, 3))
            for _ in range(200):
                if len(server.event_ids()) == 3:
                    break
                await asyncio.sleep(0.02)
            assert len(server.event_ids()) == 3
            assert server.requests()[0].at - t0 >= 0.25
        async with AsyncMeteringClient(
            server.url, API_KEY, max_batch=100, flush_interval=3600, **FAST
        ) as client:
            await client.send_many(events(3, 8))
        assert server.event_ids() == ids(0, 8)  # sent by close(), not by the hour's age limit
        with pytest.raises(RuntimeError, match="closed"):
            await client.send(make_event(99))

    asyncio.run(asyncio.wait_for(main(), 60))
    assert server.event_ids() == ids(0, 8)


def test_probes_go_to_their_own_endpoint(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    client = make_client()
    client.send(make_event(0))
    client.send_probe({"probe_id": "probe-1", "timestamp": "2025-01-01T00:00:00Z", "ok": True})
    with pytest.raises(ValueError, match="probe_id"):
        client.send_probe({"timestamp": "2025-01-01T00:00:00Z"})
    assert client.flush(timeout=10)
    assert server.state.order["/v1/probes"] == ["probe-1"]
    assert server.event_ids() == ["ev-000000"]


def test_datetimes_are_serialised_and_ids_required(
    server: FakeMeteringServer, make_client: ClientFactory
) -> None:
    ts = datetime(2025, 3, 1, 12, 30, 0, 123000, tzinfo=timezone(timedelta(hours=2)))
    client = make_client()
    client.send(make_event(0, timestamp=ts))
    client.send(make_event(1, timestamp=datetime(2025, 3, 1, tzinfo=UTC)))
    with pytest.raises(ValueError, match="tz-aware"):
        client.send(make_event(2, timestamp=datetime(2025, 3, 1)))
    for bad in ({}, {"event_id": ""}, {"event_id": 5}):
        with pytest.raises(ValueError, match="event_id"):
            client.send(bad)
    with pytest.raises(TypeError):
        client.send(make_event(3, blob=object()))
    with pytest.raises(ValueError):  # rejected whole, before any is buffered
        client.send_many([make_event(4), {"event_id": ""}])
    assert client.flush(timeout=10)
    stored = server.state.stored["/v1/events"]
    assert list(stored) == ["ev-000000", "ev-000001"]
    assert stored["ev-000000"]["timestamp"] == "2025-03-01T12:30:00.123000+02:00"
    assert stored["ev-000001"]["timestamp"] == "2025-03-01T00:00:00+00:00"
    assert client.stats()["sent"] == 2
