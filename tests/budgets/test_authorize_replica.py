"""The authorize replica (METERING_AUTHORIZE_PORT): a ledger mirror answers as its
primary after every change, and a real `metering serve` with the port answers on it as on
the main port, right after each 202, edit and revocation; it is replaced when killed and
goes away with the main process."""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from billing.budgets.ledger import Change, Limit, SpendLedger
from billing.rating import PriceBook, PriceEntry
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event
from tests.processes import ServerProcess, free_port

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DOLLAR = {"provider": "cohere", "model": "rerank-4-pro", "input_tokens": 4_000_000}


# -- the mirror, in process -------------------------------------------------------------------


def _entry(entry_id: str, price: str, since: datetime) -> PriceEntry:
    return PriceEntry(
        entry_id, "cohere", "rerank-4-pro", since, "USD", Decimal(price), Decimal(0), Decimal(0)
    )


def _checks(ledger: SpendLedger, cases: list[tuple[str, str | None]]) -> list[Any]:
    return [
        [(c.limit, c.spend, c.unpriced) for c in ledger.check(tenant, project)]
        for tenant, project in cases
    ]


def test_a_mirror_answers_as_its_ledger_after_every_change() -> None:
    now = datetime(2026, 11, 15, tzinfo=UTC)
    clock = [now]
    primary = SpendLedger(lambda: clock[0])
    mirror = SpendLedger(lambda: clock[0])
    sent: list[Change] = []

    def tell(change: Change) -> None:  # as the pipe does: a copy, in order
        sent.append(change)
        mirror.apply(pickle.loads(pickle.dumps(change)))

    cases = [("t1", None), ("t1", "p1"), ("t1", "p2"), ("t2", None), ("t3", "p9")]
    a = Limit("b1", "t1", None, Decimal("10"), True)
    b = Limit("b2", "t1", "p1", Decimal("3"), True)
    c = Limit("b3", "t2", None, Decimal("5"), False)
    primary.set_book(PriceBook([_entry("e1", "0.25", datetime(2026, 1, 1, tzinfo=UTC))]))
    primary.set_limits([a, b])
    primary.durable(0, {(("t1", None), "2026-11"): {"e1": [4_000_000, 0, 0]}})
    primary.attach_mirror(tell)  # a snapshot of what is there, then every change
    assert mirror.ready is False and _checks(mirror, cases) == _checks(primary, cases)

    def usage(scope: tuple[str, str | None], tokens: int) -> dict[Any, Any]:
        return {(scope, "2026-11"): {"e1": [tokens, 0, 0]}}

    steps = [
        lambda: primary.durable(1, usage(("t1", "p1"), 8_000_000)),
        lambda: primary.begin_resync(1),
        lambda: primary.durable(2, usage(("t1", None), 4_000_000)),
        lambda: primary.finish_resync(
            {**usage(("t1", None), 40_000_000), **usage(("t1", "p1"), 8_000_000)}
        ),
        lambda: primary.put_limit(c),
        lambda: primary.durable(3, usage(("t2", None), 4_000_000)),
        lambda: primary.put_limit(Limit("b2", "t1", "p1", Decimal("30"), True)),
        lambda: primary.drop_limit("b1"),
        lambda: primary.set_book(
            PriceBook(
                [
                    _entry("e1", "0.25", datetime(2026, 1, 1, tzinfo=UTC)),
                    _entry("e2", "1", datetime(2026, 11, 1, tzinfo=UTC)),
                ]
            )
        ),
        lambda: primary.set_limits([b, c]),
        lambda: clock.__setitem__(0, datetime(2026, 12, 1, tzinfo=UTC)),
        primary.roll,
        lambda: primary.durable(4, {(("t2", None), "2026-12"): {"e2": [1_000_000, 0, 0]}}),
    ]
    for step in steps:
        step()
        assert mirror.ready == primary.ready
        assert _checks(mirror, cases) == _checks(primary, cases)
    assert primary.ready is True
    assert _checks(mirror, [("t2", None)])[0][0][1] == Decimal("1")
    primary.attach_mirror(None)
    told = len(sent)
    primary.durable(5, usage(("t2", None), 1))
    assert len(sent) == told  # detached: told nothing more


# -- a real server with the port ----------------------------------------------------------------


def _answers(server: ServerProcess, port: int, body: Any, headers: dict[str, str]) -> Any:
    """(status, JSON) on the main port and on the authorize port, for one request."""
    out = []
    for base in (server.url, f"http://127.0.0.1:{port}"):
        r = httpx.post(f"{base}/v1/authorize", json=body, headers=headers, timeout=10)
        out.append((r.status_code, r.json()))
    return out


def _post(server: ServerProcess, path: str, body: Any, status: int = 202) -> Any:
    r = httpx.post(f"{server.url}{path}", json=body, headers=H, timeout=30)
    assert r.status_code == status, r.text
    return r.json()


def _wait_replica(port: int, pid: int | None = None, timeout: float = 30.0) -> int:
    """Until the replica answers authorize (200) from a ledger that is ready; its pid
    (another than `pid` when one was given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/authorize",
                json={"tenant_id": "nobody"},
                headers=H,
                timeout=2,
            )
            found = _replica_pid(port)
            if r.status_code == 200 and found is not None and found != pid:
                return found
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the authorize replica did not answer on {port}")


def _replica_pid(port: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"metering.budgets.replica" in cmdline and str(port).encode() in cmdline:
            return int(entry.name)
    return None


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _with_authorize_port(tmp_path: Path, **env: str) -> tuple[ServerProcess, int]:
    """A server (not started) with an authorize port, and that port."""
    port = free_port()
    server = ServerProcess(
        tmp_path / "data",
        METERING_ADMIN_TOKEN=ADMIN_TOKEN,
        METERING_AUTHORIZE_PORT=str(port),
        **env,
    )
    return server, port


def test_the_authorize_port_answers_as_the_main_port(tmp_path: Path) -> None:
    server, port = _with_authorize_port(tmp_path, METERING_AUTHORIZE_SLICE_US="100")
    try:
        server.start()
        pid = _wait_replica(port)
        assert server.metric("metering_authorize_replica_up", {}) == 1
        # It asked the kernel for the 100 us CPU slice set (METERING_AUTHORIZE_SLICE_US), where
        # the kernel has custom slices (Linux 6.12+, shown in /proc/PID/sched).
        if _custom_slices():
            assert _slice_ns(pid) == 100_000
        tenant = {"tenant_id": "acct-1", "project_id": "proj-1"}
        budget = _post(
            server,
            "/v1/budgets",
            {"tenant_id": "acct-1", "amount_usd": "3", "hard_limit": True},
            201,
        )
        _post(
            server,
            "/v1/budgets",
            {"tenant_id": "acct-1", "project_id": "proj-1", "amount_usd": "10"},
            201,
        )
        main, replica = _answers(server, port, tenant, H)
        assert main == replica and main[1]["allowed"] is True
        # Each 202 counts on the authorize port at once (read-your-writes).
        for i in range(4):
            _post(server, "/v1/events", {"events": [event(f"e{i}", **DOLLAR)]})
            main, replica = _answers(server, port, tenant, H)
            assert main == replica, (i, main, replica)
            assert main[1]["budgets"][0]["spend_usd"] == str(i + 1)
            assert main[1]["allowed"] is (i + 1 < 3)
        # An edit counts at once too: raising the amount allows again, deleting drops it.
        r = httpx.patch(
            f"{server.url}/v1/budgets/{budget['id']}", json={"amount_usd": "20"}, headers=H
        )
        assert r.status_code == 200, r.text
        main, replica = _answers(server, port, tenant, H)
        assert main == replica and main[1]["allowed"] is True
        assert httpx.delete(f"{server.url}/v1/budgets/{budget['id']}", headers=H).status_code in (
            200,
            204,
        )
        main, replica = _answers(server, port, tenant, H)
        assert main == replica and len(main[1]["budgets"]) == 1
        # Errors are the same: bad bodies, no token, a revoked key (revoked at once).
        for bad in ({"tenant_id": ""}, {"project_id": "p"}, [1], "x"):
            main, replica = _answers(server, port, bad, H)
            assert main == replica and main[0] == 400, (bad, main, replica)
        main, replica = _answers(server, port, tenant, {})
        assert main == replica and main[0] == 401
        key = _post(server, "/v1/api-keys", {"scopes": ["ingest"], "name": "gw"}, 201)
        gateway = {"Authorization": f"Bearer {key['key']}"}
        main, replica = _answers(server, port, tenant, gateway)
        assert main == replica and main[0] == 200
        assert httpx.delete(f"{server.url}/v1/api-keys/{key['id']}", headers=H).status_code == 204
        main, replica = _answers(server, port, tenant, gateway)
        assert main == replica and main[0] == 401, (main, replica)
        r = httpx.get(f"http://127.0.0.1:{port}/v1/budgets", headers=H)
        assert r.status_code == 404 and "authorize" in r.json()["error"]
        for base in (server.url, f"http://127.0.0.1:{port}"):
            r = httpx.get(f"{base}/v1/authorize", headers=H)
            assert (r.status_code, r.headers["allow"]) == (405, "POST"), base
            r = httpx.post(f"{base}/v1/authorize", content=b" " * (2 << 20), headers=H)
            assert r.status_code == 413 and "body" in r.json()["error"], base

        # kill -9 of the replica: the main process starts another, from a snapshot.
        os.kill(pid, signal.SIGKILL)
        pid = _wait_replica(port, pid)
        assert server.metric("metering_authorize_replica_starts_total", {}) == 2
        main, replica = _answers(server, port, tenant, H)
        assert main == replica and main[1]["budgets"][0]["spend_usd"] == "4"
        _post(server, "/v1/events", {"events": [event("after", **DOLLAR)]})
        main, replica = _answers(server, port, tenant, H)
        assert main == replica and main[1]["budgets"][0]["spend_usd"] == "5"

        # kill -9 of the main process: the replica does not answer on without it.
        server.kill9()
        assert _gone(pid), "the replica outlived the main process"
    finally:
        server.ensure_dead()
        found = _replica_pid(port)
        if found is not None:
            os.kill(found, signal.SIGKILL)


def _slice_ns(pid: int | str) -> int | None:
    with open(f"/proc/{pid}/sched") as handle:
        for line in handle:
            if line.startswith("se.slice"):
                return int(float(line.split(":")[1]))
    return None


def _custom_slices() -> bool:
    release = tuple(int(p) for p in os.uname().release.split(".")[:2] if p.isdigit())
    return sys.platform == "linux" and release >= (6, 12) and _slice_ns("self") is not None


def test_the_replica_asks_for_a_short_cpu_slice() -> None:
    from metering.budgets.replica import shorten_slice

    if not _custom_slices():
        import pytest

        pytest.skip("the kernel has no custom CPU slices (Linux 6.12+)")
    seen: list[int | None] = []

    def in_a_thread() -> None:  # the slice (and, on Linux, nice) are the thread's own
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, 3)
        before = _slice_ns("thread-self")
        shorten_slice(250)
        seen.extend([before, _slice_ns("thread-self"), os.getpriority(os.PRIO_PROCESS, me)])
        shorten_slice(0)  # 0: left as it is
        seen.append(_slice_ns("thread-self"))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    before, after, nice, unchanged = seen
    assert before != 250_000 and after == unchanged == 250_000
    assert nice == 3  # the nice value is kept


def _realtime_allowed() -> bool:
    """Whether this process may make a thread real-time (root or CAP_SYS_NICE): tried on
    a thread of its own, which then ends."""
    allowed: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
            allowed.append(True)
        except OSError:
            allowed.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return allowed[0]


def _policies(pid: int) -> dict[int, tuple[int, int, int]]:
    """Each thread of `pid`: (policy, real-time priority, nice)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        nice = int((task / "stat").read_text().rpartition(")")[2].split()[16])
        out[tid] = (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority, nice)
    return out


def test_the_replica_runs_at_the_real_time_priority_asked(tmp_path: Path) -> None:
    if sys.platform != "linux":
        pytest.skip("real-time scheduling as Linux has it")
    server, port = _with_authorize_port(tmp_path, METERING_AUTHORIZE_REALTIME_PRIORITY="7")
    try:
        server.start()
        pid = _wait_replica(port)
        assert pid is not None
        # A check with a key not seen yet: a database lookup on a worker thread (started
        # by the replica after the setting, or earlier by _wait_replica's first check).
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/authorize",
            json={"tenant_id": "nobody"},
            headers={"Authorization": "Bearer mk_no-such-key-0123456789"},
            timeout=10,
        )
        assert reply.status_code == 401
        threads = _policies(pid)
        policies = {(policy, rt) for policy, rt, _ in threads.values()}
        realtime = os.SCHED_RR | os.SCHED_RESET_ON_FORK
        if _realtime_allowed():
            # The event loop's thread (and any started before the setting) is real-time;
            # none of the server's. Threads started later, the worker threads that look
            # keys up, are normal tasks at nice 0 (reset on fork): the database lookups of
            # a flood of unknown keys compete with ingest as equals, not ahead of it.
            assert threads[pid][:2] == (realtime, 7)
            assert policies == {(realtime, 7), (os.SCHED_OTHER, 0)}
            normal = [t for t in threads.values() if t[0] == os.SCHED_OTHER]
            assert {nice for _, _, nice in normal} == {0}
            assert server.proc is not None
            assert os.sched_getscheduler(server.proc.pid) == os.SCHED_OTHER
        else:
            assert policies == {(os.SCHED_OTHER, 0)}  # left as it was, with a warning
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/authorize",
            json={"tenant_id": "acct-1"},
            headers=H,
            timeout=10,
        )
        assert reply.status_code == 200 and reply.json()["allowed"] is True
    finally:
        server.stop()


# -- the feed's faults, with stand-in replicas ----------------------------------------------------

# A stand-in for the replica process: says it started, then does `then`.
_STAND_IN = """
import os, sys, time
args = sys.argv[1:]
os.write(int(args[args.index("--started-fd") + 1]), b"1")
{then}
"""
_STUCK = _STAND_IN.format(then="time.sleep(3600)  # never reads the feed")
_EXITS = _STAND_IN.format(then="time.sleep(0.3)  # then exits, as a crashed replica would")


def _feed(ledger: SpendLedger, script: str, **options: Any) -> Any:
    from metering.auth.service import KeyCache
    from metering.budgets.replica import AuthorizeFeed

    command = [sys.executable, "-c", script]
    feed = AuthorizeFeed(
        ledger, KeyCache(), "token", "127.0.0.1", free_port(), command=command, **options
    )
    feed.start()
    return feed


def test_a_replica_that_stops_reading_never_makes_ingest_wait_and_is_replaced() -> None:
    ledger = SpendLedger()
    feed = _feed(ledger, _STUCK, max_behind_bytes=8 * 1024 * 1024)
    try:
        deadline = time.monotonic() + 30
        while ledger._mirror is None:  # attached once the stand-in said it started
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = feed.process
        assert first is not None
        # About 3 MB per batch: the pipe (1 MiB) fills at once and nobody reads it.
        big = {((f"t{i}", None), "2026-11"): {"e1": [i, 0, 0]} for i in range(60_000)}
        waits = []
        for seq in range(2):
            began = time.monotonic()
            ledger.durable(seq, big)
            waits.append(time.monotonic() - began)
        assert feed.starts == 1 and feed._queued > 1024 * 1024  # queued, not waited for
        assert max(waits) < 1.0, waits  # the merge and the pickling, no waiting on a pipe
        for seq in range(2, 6):  # past 8 MB behind: given up
            ledger.durable(seq, big)
        deadline = time.monotonic() + 30
        while feed.starts < 2 or feed.process is first:
            assert time.monotonic() < deadline, "the stuck replica was not replaced"
            time.sleep(0.05)
        assert first.poll() is not None  # the stuck one was killed
    finally:
        feed.stop()
    assert feed.process is not None and feed.process.poll() is not None


def test_a_replica_that_exits_is_started_again_and_leaves_no_thread() -> None:
    feed = _feed(SpendLedger(), _EXITS)
    try:
        deadline = time.monotonic() + 60
        while feed.starts < 3:
            assert time.monotonic() < deadline, "not started again"
            time.sleep(0.05)
        time.sleep(0.5)
        flushers = [t for t in threading.enumerate() if t.name == "authorize-feed-flush"]
        assert len(flushers) <= 1, flushers  # one per replica, ended with it
    finally:
        feed.stop()


def _frames(*changes: Any) -> bytes:
    out = b""
    for change in changes:
        data = pickle.dumps(change)
        out += len(data).to_bytes(4, "big") + data
    return out


def test_a_request_waits_for_changes_already_counted() -> None:
    from metering.budgets import replica

    read_fd, write_fd = os.pipe()
    counter_fd = os.memfd_create("test-feed")
    os.ftruncate(counter_fd, 8)
    counter = mmap.mmap(counter_fd, 8)
    state = replica.ReplicaState(sessions=None)  # type: ignore[arg-type]
    mirror = replica.Mirror(read_fd, state, counter_fd)
    try:
        os.write(write_fd, _frames(("admin_token", "a")))
        counter[:8] = (2).to_bytes(8, "little")  # two counted, one written so far
        began = time.monotonic()
        assert mirror.catch_up() is False  # the second never came: 503
        assert time.monotonic() - began >= replica.CATCH_UP_TIMEOUT
        assert state.admin_token == "a"
        threading.Timer(0.2, os.write, (write_fd, _frames(("admin_token", "b")))).start()
        assert mirror.catch_up() is True  # waits for it
        assert state.admin_token == "b" and mirror.applied == 2
    finally:
        counter.close()
        for fd in (read_fd, write_fd, counter_fd):
            os.close(fd)


def test_the_mirror_applies_whole_changes_only() -> None:
    from metering.budgets.replica import Mirror, ReplicaState

    read_fd, write_fd = os.pipe()
    state = ReplicaState(sessions=None)  # type: ignore[arg-type]
    mirror = Mirror(read_fd, state)
    frames = _frames(("admin_token", "tok"), ("ready", True))
    try:
        for cut in range(len(frames)):  # every split of the bytes into two writes
            os.write(write_fd, frames[:cut])
            mirror.drain()
            os.write(write_fd, frames[cut:])
            mirror.drain()
            assert state.admin_token == "tok" and state.budgets.ledger.ready is True
            state.admin_token = ""
            state.budgets.ledger.ready = False
        os.close(write_fd)
        mirror.drain()
        assert mirror.closed  # the main process went away
    finally:
        os.close(read_fd)
