"""`POST /v1/authorize` from its own process, on its own port (METERING_AUTHORIZE_PORT).

Why: on the main port, authorize shares one interpreter with ingest. At half of ingest's
maximum the ingest threads hold the GIL most of the time and the event loop answers
authorize only between 1,000-event batches, so its p99 is tens of milliseconds
(bench/RESULTS.md). A gateway that checks before every rerank request while it posts
events wants that answer in a few milliseconds whatever ingest does; a separate process
has its own interpreter, and the kernel schedules it as soon as a request arrives.

How it stays exact (read-your-writes): the main process's spend ledger tells a mirror
every change under its lock (`SpendLedger.attach_mirror`), starting with a snapshot.
`AuthorizeFeed` writes each change, framed, to a pipe whose other end this process
reads. A batch's change is written before its `202` can leave (the ledger is told in the
spool write's `durable` step), so the bytes are in the pipe before the gateway can know
the batch was accepted. The replica reads everything in the pipe before it answers each
request, so every event acknowledged before the call counts, as on the main port.
Revoked API keys are told through the same pipe and stop working at once.

The main process supervises the replica: it restarts it (with a new snapshot) if it
exits, and stops feeding it, kills it and starts a fresh one if it stops reading for
WRITE_TIMEOUT seconds, so ingest never waits on it for longer. The replica exits when
the pipe closes (the main process ended, even by `kill -9`): it never answers from a
ledger nobody updates. Several API replicas: each runs its own authorize process fed
by its own ledger (docs/budgets.md).

The replica answers only `POST /v1/authorize` (the same `answer` as the main port,
statuses, bodies and errors included) and `GET /healthz`; anything else is a 404.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from billing.budgets.ledger import Change, SpendLedger
from metering import metrics
from metering.auth.service import KeyCache
from metering.budgets.authorize import AuthorizeFastPath
from metering.errors import error_response

log = logging.getLogger(__name__)

WRITE_TIMEOUT = 2.0  # a replica that reads nothing for this long is replaced
START_TIMEOUT = 60.0  # from its start until it reads the pipe
PIPE_BYTES = 1024 * 1024  # asked of the kernel for the pipe (Linux's default cap)
RESTART_DELAY = 1.0  # first wait before starting a replica again; doubles up to the max
MAX_RESTART_DELAY = 30.0
READ_STEP = 1024 * 1024
_HEADER = struct.Struct(">I")


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
    ) -> None:
        self.ledger = ledger
        self.key_cache = key_cache
        self.admin_token = admin_token
        self.host = host
        self.port = port
        self.command = command or [sys.executable, "-m", "metering.budgets.replica"]
        self._lock = threading.Lock()  # one writer at a time on the pipe
        self._fd: int | None = None
        self._broken = threading.Event()
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
        try:
            self.process = subprocess.Popen(
                [
                    *self.command,
                    "--fd",
                    str(read_fd),
                    "--started-fd",
                    str(said_fd),
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                pass_fds=(read_fd, said_fd),
            )
        finally:
            os.close(read_fd)
            os.close(said_fd)
        os.set_blocking(write_fd, False)
        self.starts += 1
        metrics.AUTHORIZE_REPLICA_STARTS.inc()
        self._broken.clear()
        with self._lock:
            self._fd = write_fd
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
                os.close(write_fd)
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
        """Write one change, whole. Called under the ledger's lock for its changes: it
        never waits more than WRITE_TIMEOUT; past that the replica is given up."""
        data = pickle.dumps(change, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _HEADER.pack(len(data)) + data
        with self._lock:
            fd = self._fd
            if fd is None or self._broken.is_set():
                return
            view = memoryview(frame)
            deadline = time.monotonic() + WRITE_TIMEOUT
            while view:
                try:
                    written = os.write(fd, view)
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.error("authorize replica: not reading for %gs", WRITE_TIMEOUT)
                        self._broken.set()
                        return
                    select.select([], [fd], [], min(left, 0.05))
                    continue
                except OSError as exc:  # the replica is gone (EPIPE)
                    log.warning("authorize replica: pipe closed (%s)", exc)
                    self._broken.set()
                    return
                view = view[written:]


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
    """The replica's end of the pipe: reads what is there, applies whole changes."""

    def __init__(self, fd: int, state: ReplicaState) -> None:
        self.fd = fd
        self.state = state
        self.closed = False
        self.on_close: Callable[[], None] | None = None
        self._buffer = bytearray()
        os.set_blocking(fd, False)

    def drain(self) -> None:
        """Apply every change the main process has written so far."""
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
            self.state.apply(pickle.loads(buffer[at + _HEADER.size : end]))
            at = end
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


class _Drained:
    """Outermost: the pipe is read to its end before each request is looked at."""

    def __init__(self, app: ASGIApp, mirror: Mirror) -> None:
        self.app = app
        self.mirror = mirror

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.mirror.drain()
        await self.app(scope, receive, send)


def build_app(state: ReplicaState, mirror: Mirror, started_fd: int | None = None) -> ASGIApp:
    async def healthz(_: Request) -> Response:
        if mirror.closed:
            return error_response(503, "authorize: the main process is gone")
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def not_found(_: Request, __: Exception) -> Response:
        return error_response(404, "path: this port serves POST /v1/authorize only")

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        import asyncio

        loop = asyncio.get_running_loop()
        loop.add_reader(mirror.fd, mirror.drain)
        if started_fd is not None:
            os.write(started_fd, b"1")
            os.close(started_fd)
        try:
            yield
        finally:
            if not mirror.closed:
                loop.remove_reader(mirror.fd)

    app = Starlette(
        routes=[Route("/healthz", healthz, methods=["GET"])],
        exception_handlers={404: not_found},
        lifespan=lifespan,
    )
    app.state.services = state
    app.add_middleware(AuthorizeFastPath)
    return _Drained(app, mirror)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metering.budgets.replica")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--started-fd", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from metering.db.engine import make_engine, make_session_factory
    from metering.http.protocol import HttpLimits, protocol_class
    from metering.settings import Settings

    settings = Settings()
    state = ReplicaState(make_session_factory(make_engine(settings.resolved_database_url)))
    mirror = Mirror(args.fd, state)

    def closed() -> None:
        log.warning("authorize replica: the main process closed the feed; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    mirror.on_close = closed
    uvicorn.run(
        build_app(state, mirror, args.started_fd),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=protocol_class(HttpLimits.from_settings(settings)),
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
