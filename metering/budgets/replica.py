"""`POST /v1/authorize` from its own process, on its own port (METERING_AUTHORIZE_PORT).

Why: on the main port, authorize shares one interpreter with ingest. At half of ingest's
maximum the ingest threads hold the GIL most of the time and the event loop answers
authorize only between 1,000-event batches, so its p99 is tens of milliseconds
(bench/RESULTS.md). A gateway that checks before every rerank request while it posts
events wants that answer in a few milliseconds whatever ingest does; a separate process
has its own interpreter, and the kernel schedules it as soon as a request arrives.

How it stays exact (read-your-writes): the main process's spend ledger tells a mirror
every change under its lock (`SpendLedger.attach_mirror`), starting with a snapshot.
`AuthorizeFeed` writes each change, framed, to a pipe whose other end the replica reads,
and counts it in a shared counter (8 bytes of shared memory). A batch's change is
counted where the ledger counts the batch, before its `202` can leave. Before it looks
at a request, the replica reads and applies changes until it has applied as many as the
counter says were sent: every event acknowledged before the call counts, as on the main
port. Revoked API keys are told the same way and stop working at once.

The main process never waits for the replica: a change is written at once while the pipe
has room, else queued and written by a flusher thread (the counter already counts it, so
a request arriving meanwhile waits in the replica, up to CATCH_UP_TIMEOUT, then gets
503). A replica that lets MAX_BEHIND_BYTES queue up, or exits, is killed and replaced
from a new snapshot. The replica exits when the pipe closes (the main process ended,
even by `kill -9`): it never answers from a ledger nobody updates. Several API replicas:
each runs its own authorize process fed by its own ledger (docs/budgets.md).

The replica answers only `POST /v1/authorize` (the same `answer` as the main port,
statuses, bodies and errors included) and `GET /healthz`; anything else is a 404.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import mmap
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from billing.budgets.ledger import Change, SpendLedger
from metering import metrics
from metering.auth.service import KeyCache
from metering.budgets.authorize import PATH as AUTHORIZE_PATH
from metering.budgets.authorize import AuthorizeFastPath
from metering.errors import error_response

log = logging.getLogger(__name__)

MAX_BEHIND_BYTES = 256 * 1024 * 1024  # queued for a replica that does not read: replaced
CATCH_UP_TIMEOUT = 1.0  # a request waits this long for changes already counted, else 503
START_TIMEOUT = 60.0  # from its start until it reads the pipe
PIPE_BYTES = 1024 * 1024  # asked of the kernel for the pipe (Linux's default cap)
RESTART_DELAY = 1.0  # first wait before starting a replica again; doubles up to the max
MAX_RESTART_DELAY = 30.0
READ_STEP = 1024 * 1024
BIG_FRAME = 1024 * 1024  # changes this large are logged
_HEADER = struct.Struct(">I")
_COUNT = struct.Struct("<Q")  # changes sent to the current replica (shared memory)


# -- the main process's side ----------------------------------------------------------------


class AuthorizeFeed:
    """Starts the replica process, feeds it the ledger's changes, restarts it."""

    def __init__(
        self,
        ledger: SpendLedger,
        key_cache: KeyCache,
        admin_token: str,
        host: str,
        port: int,
        *,
        command: list[str] | None = None,
        max_behind_bytes: int = MAX_BEHIND_BYTES,
    ) -> None:
        self.ledger = ledger
        self.key_cache = key_cache
        self.admin_token = admin_token
        self.host = host
        self.port = port
        self.command = command or [sys.executable, "-m", "metering.budgets.replica"]
        self.max_behind_bytes = max_behind_bytes
        self._lock = threading.Lock()  # one writer at a time on the pipe
        self._fd: int | None = None
        self._broken = threading.Event()
        self._queue: deque[memoryview] = deque()  # not yet written, in order
        self._queued = 0  # bytes in the queue
        self._flush = threading.Event()
        self._counter: mmap.mmap | None = None
        self._sent = 0  # changes counted for the current replica
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.key_cache.on_forget = self.forget_key
        self._thread = threading.Thread(target=self._run, name="authorize-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._broken.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.key_cache.on_forget = None

    def forget_key(self, key_id: str) -> None:
        self._send(("forget_key", key_id))

    # -- supervision ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = RESTART_DELAY
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._serve_one()
            except Exception:
                log.exception("authorize replica: failed")
            if self._stop.is_set():
                return
            if time.monotonic() - began > 60:
                delay = RESTART_DELAY
            log.warning("authorize replica: stopped; starting another in %g s", delay)
            self._stop.wait(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)

    def _serve_one(self) -> None:
        read_fd, write_fd = os.pipe()
        # The replica writes one byte here once it reads the feed: the snapshot (several
        # MB with many budgets, written under the ledger's lock) waits for that.
        started_fd, said_fd = os.pipe()
        _widen(write_fd)
        counter_fd = os.memfd_create("metering-authorize-feed")
        os.ftruncate(counter_fd, _COUNT.size)
        counter = mmap.mmap(counter_fd, _COUNT.size)
        try:
            self.process = subprocess.Popen(
                [
                    *self.command,
                    "--fd",
                    str(read_fd),
                    "--started-fd",
                    str(said_fd),
                    "--counter-fd",
                    str(counter_fd),
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                pass_fds=(read_fd, said_fd, counter_fd),
            )
        finally:
            os.close(read_fd)
            os.close(said_fd)
            os.close(counter_fd)
        os.set_blocking(write_fd, False)
        self.starts += 1
        metrics.AUTHORIZE_REPLICA_STARTS.inc()
        self._broken.clear()
        with self._lock:
            self._fd = write_fd
            self._counter = counter
            self._sent = 0
            self._queue.clear()
            self._queued = 0
        flusher = threading.Thread(
            target=self._flusher, args=(write_fd,), name="authorize-feed-flush", daemon=True
        )
        flusher.start()
        try:
            if not self._wait_started(started_fd):
                return
            self._send(("admin_token", self.admin_token))
            self.ledger.attach_mirror(self._send)
            metrics.AUTHORIZE_REPLICA_UP.set(1)
            while not self._stop.is_set() and not self._broken.is_set():
                if self.process.poll() is not None:
                    break
                self._broken.wait(0.5)
        finally:
            metrics.AUTHORIZE_REPLICA_UP.set(0)
            self.ledger.attach_mirror(None)
            with self._lock:
                self._fd = None
                self._counter = None
                self._queue.clear()
                self._queued = 0
            self._flush.set()
            flusher.join(timeout=5)
            os.close(write_fd)
            counter.close()
            os.close(started_fd)
            _end(self.process)

    def _wait_started(self, fd: int) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        assert self.process is not None
        while not self._stop.is_set() and self.process.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("authorize replica: not reading after %gs", START_TIMEOUT)
                return False
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                return os.read(fd, 1) == b"1"
        return False

    def _send(self, change: tuple[str, object]) -> None:
        """Send one change and count it. Called under the ledger's lock for its changes:
        it never waits (a full pipe queues the change for the flusher thread)."""
        if self._fd is None or self._broken.is_set():
            return  # nothing fed (checked again below, under the lock)
        data = pickle.dumps(change, protocol=pickle.HIGHEST_PROTOCOL)
        frame = memoryview(_HEADER.pack(len(data)) + data)
        if len(frame) > BIG_FRAME:
            log.info("authorize replica: a %s change of %d bytes", change[0], len(frame))
        with self._lock:
            fd, counter = self._fd, self._counter
            if fd is None or counter is None or self._broken.is_set():
                return
            if not self._queue:
                try:
                    frame = frame[os.write(fd, frame) :]
                except BlockingIOError:
                    pass
                except OSError as exc:  # the replica is gone (EPIPE)
                    log.warning("authorize replica: pipe closed (%s)", exc)
                    self._give_up()
                    return
            if frame:
                if not self._queue:
                    log.info("authorize replica: the pipe is full; queueing for it")
                self._queue.append(frame)
                self._queued += len(frame)
                self._flush.set()
                if self._queued > self.max_behind_bytes:
                    log.error("authorize replica: %d bytes behind; replacing it", self._queued)
                    self._give_up()
                    return
            self._sent += 1
            _COUNT.pack_into(counter, 0, self._sent)

    def _flusher(self, fd: int) -> None:
        """Writes what `_send` queued, in order, while the pipe has room."""
        while True:
            self._flush.wait(0.5)
            while True:
                with self._lock:
                    if self._fd != fd or self._broken.is_set():
                        return  # this replica is over (a new one gets its own flusher)
                    if not self._queue:
                        self._flush.clear()
                        break
                    head = self._queue[0]
                    try:
                        written = os.write(fd, head)
                    except BlockingIOError:
                        written = 0
                    except OSError:
                        self._give_up()
                        return
                    self._queued -= written
                    if written == len(head):
                        self._queue.popleft()
                        if not self._queue:
                            log.info("authorize replica: caught up")
                    else:
                        self._queue[0] = head[written:]
                if written == 0:
                    select.select([], [fd], [], 0.1)

    def _give_up(self) -> None:
        """Feed it no more, and kill it now: it must not answer from what it was told
        before (the supervisor then starts another, from a snapshot). Caller may hold
        the feed's lock."""
        self._broken.set()
        self._flush.set()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def _widen(fd: int) -> None:
    """Ask for a larger pipe buffer (Linux; elsewhere the default stays)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the replica process --------------------------------------------------------------------


class Mirror:
    """The replica's end of the pipe: reads what is there, applies whole changes, and
    catches up with the main process's count of changes sent (`counter_fd`)."""

    def __init__(self, fd: int, state: ReplicaState, counter_fd: int | None = None) -> None:
        self.fd = fd
        self.state = state
        self.closed = False
        self.applied = 0  # changes applied
        self.on_close: Callable[[], None] | None = None
        self._buffer = bytearray()
        self._counter = (
            None if counter_fd is None else mmap.mmap(counter_fd, _COUNT.size, prot=mmap.PROT_READ)
        )
        os.set_blocking(fd, False)

    def catch_up(self) -> bool:
        """Apply changes until every change the main process had counted when this was
        called is applied (read-your-writes); False if that took CATCH_UP_TIMEOUT or
        the main process is gone."""
        if self._counter is None:
            self.drain()
            return not self.closed
        (sent,) = _COUNT.unpack_from(self._counter, 0)
        if self.applied >= sent:  # all applied (the loop reads the pipe as it fills)
            return not self.closed
        self.drain()
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while self.applied < sent and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("authorize replica: %d changes behind", sent - self.applied)
                return False
            select.select([self.fd], [], [], left)
            self._drain()
        return not self.closed

    def drain(self) -> None:
        """Apply every change the main process has written so far."""
        began = time.monotonic()
        self._drain()
        took = time.monotonic() - began
        if took > 0.2:
            log.warning("authorize replica: reading the feed took %.3f s", took)

    def _drain(self) -> None:
        while not self.closed:
            try:
                chunk = os.read(self.fd, READ_STEP)
            except BlockingIOError:
                break
            if not chunk:
                self.closed = True
                self.state.budgets.ledger.ready = False
                if self.on_close is not None:
                    self.on_close()
                break
            self._buffer += chunk
            self._apply_whole()

    def _apply_whole(self) -> None:
        buffer = self._buffer
        at = 0
        while len(buffer) - at >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, at)
            end = at + _HEADER.size + size
            if len(buffer) < end:
                break
            change = pickle.loads(buffer[at + _HEADER.size : end])
            self.state.apply(change)
            self.applied += 1
            at = end
            if change == ("ready", True):
                # The snapshot is in: keep its objects out of the collector's way (a
                # full collection over a big ledger paused answers for ~150 ms).
                gc.collect()
                gc.freeze()
        del buffer[:at]


@dataclass
class _Budgets:
    ledger: SpendLedger

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)


@dataclass
class ReplicaState:
    """What `answer` needs (AuthorizeState), kept current from the main process."""

    sessions: sessionmaker[Session]
    admin_token: str = ""
    key_cache: KeyCache = field(default_factory=KeyCache)
    budgets: Any = None

    def __post_init__(self) -> None:
        if self.budgets is None:
            self.budgets = _Budgets(SpendLedger())

    def apply(self, change: Change) -> None:
        kind, value = change
        if kind == "admin_token":
            assert isinstance(value, str)
            self.admin_token = value
        elif kind == "forget_key":
            assert isinstance(value, str)
            self.key_cache.forget_key(value)
        else:
            self.budgets.ledger.apply(change)


class ReplicaApp:
    """The replica's ASGI app: a plain callable (no framework: every microsecond of CPU
    per check counts when the machine is busy). The pipe is read to its end before each
    request is looked at; POST /v1/authorize goes to the same fast path as on the main
    port, which finds the state as `scope["app"].state.services`."""

    def __init__(self, state: ReplicaState, mirror: Mirror, started_fd: int | None = None):
        self.state = SimpleNamespace(services=state)
        self.mirror = mirror
        self.started_fd = started_fd
        self.authorize = AuthorizeFastPath(self._other, count=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if not self.mirror.catch_up():
                reason = "authorize: catching up with the main process; retry"
                await error_response(503, reason, {"Retry-After": "1"})(scope, receive, send)
                return
            scope["app"] = self
            await self.authorize(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/healthz" and method in ("GET", "HEAD"):
            if self.mirror.closed:
                response = error_response(503, "authorize: the main process is gone")
            else:
                response = Response(b'{"status":"ok"}', media_type="application/json")
        elif path == AUTHORIZE_PATH:
            response = error_response(
                405, f"method: {method} is not allowed on {path}", {"Allow": "POST"}
            )
        else:
            response = error_response(404, "path: this port serves POST /v1/authorize only")
        await response(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                loop.add_reader(self.mirror.fd, self.mirror.drain)
                if self.started_fd is not None:
                    os.write(self.started_fd, b"1")
                    os.close(self.started_fd)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if not self.mirror.closed:
                    loop.remove_reader(self.mirror.fd)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _prioritize(nice: int) -> None:
    """Run at CPU priority `nice` (set before any thread starts: threads inherit it). A
    check waiting for a core behind ingest's batch work is what makes its tail on a busy
    machine; a lower nice lets the kernel run it first. Without the right to lower it,
    the process stays where it is."""
    if nice == 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        log.warning("authorize replica: cannot set CPU priority (nice) %d: %s", nice, exc)


def run_realtime(priority: int) -> None:
    """Run under SCHED_RR at `priority` (1-99; 0: leave the policy as it is). Linux's
    policy is per thread: it is set on every thread there is (an import may have started
    some, OpenBLAS's for one), the event loop's among them, with SCHED_RESET_ON_FORK:
    threads started later run as normal tasks at nice 0. Those are the worker threads
    that look unknown keys up in the database; real-time, a flood of fresh unknown keys
    held more than one core (121%) and left ingest 0.15 of its rate. So real-time work is
    the event loop's alone, one core at most.

    On a machine that ingest keeps busy, a check's tail is its wait for a core: nice and
    a short slice only weigh the kernel's choice among normal tasks, a real-time task
    runs first. The cost is the reverse: while it has work, it holds its core (the kernel
    keeps 5% of each core for normal tasks), so a flood of checks takes it from ingest
    (docs/budgets.md). Hence opt-in."""
    if not priority:
        return
    try:
        tasks = [int(task) for task in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]
    try:
        policy = os.SCHED_RR | os.SCHED_RESET_ON_FORK
        for task in tasks:
            os.sched_setscheduler(task, policy, os.sched_param(priority))
    except (OSError, AttributeError) as exc:
        log.warning("authorize replica: cannot run at real-time priority %d: %s", priority, exc)


class _SchedAttr(ctypes.Structure):
    """Linux's `struct sched_attr` (SCHED_ATTR_SIZE_VER1)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("policy", ctypes.c_uint32),
        ("flags", ctypes.c_uint64),
        ("nice", ctypes.c_int32),
        ("priority", ctypes.c_uint32),
        ("runtime", ctypes.c_uint64),
        ("deadline", ctypes.c_uint64),
        ("period", ctypes.c_uint64),
        ("util_min", ctypes.c_uint32),
        ("util_max", ctypes.c_uint32),
    ]


# sched_setattr / sched_getattr by architecture (Linux).
_SCHED_CALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}


def shorten_slice(slice_us: int) -> None:
    """Ask the kernel for a CPU slice of `slice_us` for this thread (the event loop's).

    On a busy machine a check waits for a core; since Linux 6.12 (EEVDF) a task that asks
    for a shorter slice (`sched_attr.sched_runtime` of a normal task) gets an earlier
    deadline, so when it wakes with a request it preempts a thread running out a longer
    one instead of waiting for it to end. Unprivileged; the task's share of the CPU stays
    what its nice value gives. Elsewhere (older kernels, other systems) this does nothing.
    """
    calls = _SCHED_CALLS.get(os.uname().machine) if sys.platform == "linux" else None
    if not slice_us or calls is None:
        return
    setattr_call, getattr_call = calls
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _SchedAttr()
    size = ctypes.sizeof(_SchedAttr)
    if libc.syscall(getattr_call, 0, ctypes.byref(attr), size, 0) != 0:
        log.warning("authorize replica: sched_getattr failed (errno %d)", ctypes.get_errno())
        return
    attr.size = size
    attr.flags = 0
    attr.runtime = slice_us * 1000  # the nice value and policy read above are kept
    if libc.syscall(setattr_call, 0, ctypes.byref(attr), 0) != 0:
        log.warning(
            "authorize replica: cannot set a %d us CPU slice (errno %d)",
            slice_us,
            ctypes.get_errno(),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metering.budgets.replica")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--started-fd", type=int, default=None)
    parser.add_argument("--counter-fd", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from metering.budgets.replica_http import replica_protocol_class
    from metering.db.engine import make_engine, make_session_factory
    from metering.http.protocol import HttpLimits
    from metering.settings import Settings

    settings = Settings()
    _prioritize(settings.authorize_nice)
    shorten_slice(settings.authorize_slice_us)
    run_realtime(settings.authorize_realtime_priority)
    gc.set_threshold(50_000, 20, 100)  # as the main process: fewer, larger collections
    state = ReplicaState(make_session_factory(make_engine(settings.resolved_database_url)))
    mirror = Mirror(args.fd, state, args.counter_fd)

    def closed() -> None:
        log.warning("authorize replica: the main process closed the feed; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    mirror.on_close = closed
    app = ReplicaApp(state, mirror, args.started_fd)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=replica_protocol_class(HttpLimits.from_settings(settings), app),
        access_log=False,
        log_level="warning",
        proxy_headers=False,  # nothing here reads the client's address
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
