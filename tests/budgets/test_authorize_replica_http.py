"""The authorize replica's own HTTP protocol (metering/budgets/replica_http.py): checks it
answers itself are byte for byte what the ASGI path answers, in order with everything else
on the connection, under the same limits and timeouts.

Two real servers (uvicorn on uvloop, in threads) share one replica's state: one with
`ReplicaProtocol`, one with the plain `LimitedHttpToolsProtocol`, so every request goes the
ASGI way there. A counting wrapper around the app shows which requests the protocol
answered itself (none reach the app)."""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import uvicorn
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from billing.budgets.forecast import period_of
from billing.budgets.ledger import Change, Limit, SpendLedger
from billing.rating import PriceBook, PriceEntry
from metering.auth.models import ApiKey
from metering.auth.service import Principal
from metering.budgets.replica import Mirror, ReplicaApp, ReplicaState
from metering.budgets.replica_http import replica_protocol_class
from metering.http.protocol import MAX_JSON_BODY, HttpLimits, protocol_class
from tests.processes import free_port

TOKEN = "replica-admin-token-0123456789"
READER = "reader-only-key-0123456789"  # a cached key without the ingest scope
LIMITS = HttpLimits(
    max_header_bytes=8 * 1024,
    keep_alive_seconds=1.0,
    header_timeout_seconds=1.0,
    body_timeout_seconds=1.0,
)


class _Counting:
    """The ASGI app, counting the HTTP requests that reach it."""

    def __init__(self, app: ReplicaApp) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.calls += 1
        await self.app(scope, receive, send)


class _Server:
    def __init__(self, app: Any, http: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            http=http,
            loop="uvloop",
            lifespan="off",
            log_level="warning",
            access_log=False,
            proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class _Replica:
    """A replica's state and mirror, fed by a primary ledger in this process."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        period = period_of(self.now)
        self.primary = SpendLedger()
        # One in-memory database for every thread's connection, with the API keys' table
        # (an unknown key's lookup finds no row).
        engine = create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
        ApiKey.__table__.create(engine)
        self.state = ReplicaState(sessions=sessionmaker(engine))
        self.read_fd, self.write_fd = os.pipe()
        self.mirror = Mirror(self.read_fd, self.state)
        self.app = ReplicaApp(self.state, self.mirror)
        book = PriceBook(
            [
                PriceEntry(
                    "e1",
                    "cohere",
                    "rerank-4-pro",
                    datetime(2026, 1, 1, tzinfo=UTC),
                    "USD",
                    Decimal("0.25"),
                    Decimal(0),
                    Decimal(0),
                )
            ]
        )
        self.primary.set_book(book)
        self.primary.set_limits(
            [
                Limit("b-open", "t-open", None, Decimal("10"), True),
                Limit("b-open-p", "t-open", "p1", Decimal("3"), False),
                Limit("b-spent", "t-spent", None, Decimal("1"), True),
            ]
        )
        self.primary.begin_resync(0)  # as at start: spend read from ClickHouse, ready
        self.primary.finish_resync({(("t-spent", None), period): {"e1": [4_000_000, 0, 0]}})
        assert self.primary.ready
        self.primary.attach_mirror(self.tell)
        self.state.admin_token = TOKEN

    def tell(self, change: Change) -> None:
        self.state.apply(change)

    def close(self) -> None:
        self.primary.attach_mirror(None)
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture()
def replica() -> Iterator[_Replica]:
    r = _Replica()
    yield r
    r.close()


@pytest.fixture()
def servers(replica: _Replica) -> Iterator[tuple[_Counting, int, int]]:
    """(the lean server's counting app, the lean port, the ASGI-only port)"""
    counting = _Counting(replica.app)
    lean = _Server(counting, replica_protocol_class(LIMITS, replica.app))
    plain = _Server(replica.app, protocol_class(LIMITS))
    try:
        yield counting, lean.port, plain.port
    finally:
        lean.stop()
        plain.stop()


# -- a raw HTTP/1.1 client -----------------------------------------------------------------------


def _check(
    body: bytes | str,
    token: str = TOKEN,
    *,
    extra: str = "",
    version: str = "1.1",
    length: int | None = None,
) -> bytes:
    raw = body.encode() if isinstance(body, str) else body
    size = len(raw) if length is None else length
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST /v1/authorize HTTP/{version}\r\nHost: x\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n{extra}\r\n"
    )
    return head.encode() + raw


def _chunked(*pieces: bytes, token: str = TOKEN) -> bytes:
    head = (
        f"POST /v1/authorize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class _Reply:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def without_date(self) -> tuple[int, list[tuple[str, str]], bytes]:
        return self.status, [h for h in self.headers if h[0] != "date"], self.body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class _Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def reply(self) -> _Reply:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError(f"closed; got {self.buffer!r}")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [
            (name.lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        ]
        size = int(dict(headers).get("content-length", "0"))
        while len(self.buffer) < size:
            if not self._fill():
                raise EOFError("closed in a body")
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return _Reply(status, headers, body)

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (any bytes before are dropped)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


def _ask(port: int, request: bytes) -> _Reply:
    conn = _Conn(port)
    try:
        conn.send(request)
        return conn.reply()
    finally:
        conn.close()


# -- the tests ----------------------------------------------------------------------------------


def _cases() -> list[tuple[str, bytes]]:
    return [
        ("allowed", _check('{"tenant_id": "t-open", "project_id": "p1"}')),
        ("denied", _check('{"tenant_id": "t-spent"}')),
        ("no budgets", _check('{"tenant_id": "t-none"}')),
        ("empty tenant", _check('{"tenant_id": ""}')),
        ("bad characters", _check('{"tenant_id": "a b", "project_id": "x/y"}')),
        ("missing tenant", _check('{"project_id": "p"}')),
        ("not an object", _check("[1]")),
        ("not JSON", _check("{")),
        ("bad UTF-8", _check(b'{"tenant_id": "\xff"}')),
        ("deep", _check("[" * 100_000 + "]" * 100_000)),
        ("no body", _check("")),
        ("read scope only", _check('{"tenant_id": "t-open"}', READER)),
        ("HTTP/1.0", _check('{"tenant_id": "t-open"}', version="1.0")),
        ("Connection: close", _check('{"tenant_id": "t-open"}', extra="Connection: close\r\n")),
        ("chunked", _chunked(b'{"tenant_id": ', b'"t-open"}')),
        ("declared too large", _check("{}", length=MAX_JSON_BODY + 1)),
        ("too large", _check(b" " * (MAX_JSON_BODY + 1))),
        ("chunked too large", _chunked(*[b" " * 65536] * 17)),
    ]


def test_checks_answered_in_the_protocol_are_the_asgi_answers_byte_for_byte(
    replica: _Replica, servers: tuple[_Counting, int, int]
) -> None:
    counting, lean, plain = servers
    reader = Principal("key", frozenset({"read"}), "t-open", "key_reader")
    replica.state.key_cache.put(READER, reader)
    _ask(lean, _check('{"tenant_id": "t-open"}'))  # the first look-up caches the token
    calls = counting.calls
    for name, request in _cases():
        want = _ask(plain, request).without_date()
        got = _ask(lean, request)
        assert got.without_date() == want, name
        assert got.header("date"), name
    assert counting.calls == calls, "a check with a cached key reached the ASGI app"
    statuses = {name: _ask(lean, request).status for name, request in _cases()}
    assert statuses["allowed"] == statuses["denied"] == statuses["chunked"] == 200
    assert b'"allowed":false' in _ask(lean, _check('{"tenant_id": "t-spent"}')).body
    assert statuses["read scope only"] == 403 and statuses["too large"] == 413
    assert statuses["deep"] == statuses["not JSON"] == statuses["bad UTF-8"] == 400


def test_what_the_protocol_does_not_answer_goes_the_asgi_way(
    replica: _Replica, servers: tuple[_Counting, int, int]
) -> None:
    counting, lean, plain = servers
    others = [
        ("no token", _check('{"tenant_id": "t-open"}', token="")),
        ("unknown token", _check('{"tenant_id": "t-open"}', token="nope")),
        ("GET", b"GET /v1/authorize HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("healthz", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("other path", b"GET /v1/budgets HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("query", b"POST /v1/authorize?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
    ]
    for name, request in others:
        calls = counting.calls
        got = _ask(lean, request).without_date()  # first: the token is new to the replica
        assert got == _ask(plain, request).without_date(), name
        assert counting.calls == calls + 1, name
    # Expect: 100-continue: the ASGI path sends the interim answer, then the check's.
    conn = _Conn(lean)
    try:
        body = b'{"tenant_id": "t-open"}'
        head, _, _ = _check(body, extra="Expect: 100-continue\r\n").partition(b"\r\n\r\n")
        conn.send(head + b"\r\n\r\n")
        assert conn.reply().status == 100
        conn.send(body)
        reply = conn.reply()
        assert reply.status == 200 and b'"b-open"' in reply.body
    finally:
        conn.close()


def test_a_token_found_to_be_no_key_is_refused_in_the_protocol(
    replica: _Replica, servers: tuple[_Counting, int, int]
) -> None:
    """The first check with an unknown (or revoked) key goes the ASGI way (a database
    lookup, 401); repeats are refused in the protocol, with the same bytes, until the key
    cache's ttl has passed. Too large a body is still 413 first, as on the ASGI path."""
    counting, lean, plain = servers
    for token in ("mk_unknown-0123456789", "no-key-prefix"):
        request = _check('{"tenant_id": "t-open"}', token)
        calls = counting.calls
        first = _ask(lean, request)
        assert first.status == 401 and counting.calls == calls + 1, token
        want = _ask(plain, request).without_date()
        for again in (request, _chunked(b'{"tenant_id": ', b'"t-open"}', token=token)):
            got = _ask(lean, again)
            assert got.without_date() == want, token
            assert got.header("www-authenticate") == "Bearer"
        assert counting.calls == calls + 1, f"{token}: a repeat reached the ASGI app"
        big = _ask(lean, _check(b" " * (MAX_JSON_BODY + 1), token))
        assert (
            big.without_date()
            == _ask(plain, _check(b" " * (MAX_JSON_BODY + 1), token)).without_date()
        )
        assert big.status == 413


def test_pipelined_requests_are_answered_in_order(
    replica: _Replica, servers: tuple[_Counting, int, int]
) -> None:
    _, lean, _ = servers
    _ask(lean, _check('{"tenant_id": "t-open"}'))
    requests = [
        _check('{"tenant_id": "t-open"}'),
        _check('{"tenant_id": "t-spent"}'),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # the ASGI path, in between
        _check('{"tenant_id": "t-none"}'),
        _check('{"tenant_id": "t-open"}', token="unknown"),  # a database look-up: 401
        _check('{"tenant_id": "t-spent"}'),
        _check("{"),
    ]
    want = [(200, b"b-open"), (200, b"b-spent"), (200, b"ok"), (200, b"[]"), (401, b"token")]
    want += [(200, b"b-spent"), (400, b"JSON")]
    for split in (None, 1, 7, 100):  # all in one write, or in pieces of `split` bytes
        conn = _Conn(lean)
        try:
            data = b"".join(requests)
            if split is None:
                conn.send(data)
            else:
                for at in range(0, len(data), split):
                    conn.send(data[at : at + split])
            replies = [conn.reply() for _ in requests]
        finally:
            conn.close()
        for (status, marker), reply in zip(want, replies, strict=True):
            assert reply.status == status and marker in reply.body, (split, reply.body)


def test_a_client_that_does_not_read_its_answers_is_not_buffered_without_bound(
    replica: _Replica, servers: tuple[_Counting, int, int]
) -> None:
    counting, lean, _ = servers
    _ask(lean, _check('{"tenant_id": "t-open"}'))
    calls = counting.calls
    request = _check('{"tenant_id": "t-open", "project_id": "p1"}')
    count = 20_000  # about 6 MB of answers, far past the transport's high-water mark
    conn = _Conn(lean)
    try:
        sender = threading.Thread(target=conn.send, args=(request * count,), daemon=True)
        sender.start()
        # The server writes until the socket is full, then buffers. Past the transport's
        # high-water mark, checks take the ASGI path: it waits for the buffer to drain
        # and stops reading meanwhile (uvicorn's flow control). Without that, every check
        # would be answered in the protocol and buffered: no call would ever reach the app.
        deadline = time.monotonic() + 30
        while counting.calls == calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counting.calls > calls, "answers were buffered without bound"
        replies = [conn.reply() for _ in range(count)]
        sender.join(10)
    finally:
        conn.close()
    assert all(r.status == 200 and b"b-open-p" in r.body for r in replies)


def test_limits_and_timeouts_hold_for_checks_answered_in_the_protocol(
    replica: _Replica, servers: tuple[_Counting, int, int]
) -> None:
    _, lean, _ = servers
    _ask(lean, _check('{"tenant_id": "t-open"}'))
    # A body that stops: 408 after the body timeout, then the connection closes.
    conn = _Conn(lean)
    try:
        conn.send(_check('{"tenant_id": "t-open"}', length=100))
        began = time.monotonic()
        reply = conn.reply()
        assert reply.status == 408 and time.monotonic() - began >= 0.9
        assert conn.closed()
    finally:
        conn.close()
    # A head past the limit: 431.
    big = _check('{"tenant_id": "t-open"}', extra=f"X-Pad: {'a' * 10_000}\r\n")
    assert _ask(lean, big).status == 431
    # A head that never ends: 408 after the header timeout.
    conn = _Conn(lean)
    try:
        conn.send(b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\n")
        assert conn.reply().status == 408
    finally:
        conn.close()
    # After an answer, an idle connection is closed after the keep-alive timeout...
    conn = _Conn(lean)
    try:
        conn.send(_check('{"tenant_id": "t-open"}'))
        assert conn.reply().status == 200
        began = time.monotonic()
        assert conn.closed() and 0.9 <= time.monotonic() - began < 4
    finally:
        conn.close()
    # ...but one that keeps asking stays open past it.
    conn = _Conn(lean)
    try:
        for _ in range(8):
            conn.send(_check('{"tenant_id": "t-open"}'))
            assert conn.reply().status == 200
            time.sleep(0.25)
    finally:
        conn.close()
    # HTTP/1.0 and Connection: close are answered, then closed.
    for request in (
        _check('{"tenant_id": "t-open"}', version="1.0"),
        _check('{"tenant_id": "t-open"}', extra="Connection: close\r\n"),
    ):
        conn = _Conn(lean)
        try:
            conn.send(request)
            reply = conn.reply()
            assert reply.status == 200 and reply.header("connection") == "close"
            assert conn.closed(1.0)
        finally:
            conn.close()


def test_a_check_counts_what_the_main_process_sent_before_it(
    replica: _Replica, servers: tuple[_Counting, int, int]
) -> None:
    """Read-your-writes through the protocol's own path: a revoked key is refused and new
    spend counts on the very next check (the mirror catches up before it looks)."""
    counting, lean, _ = servers
    key = "gateway-key-0123456789"  # not mk_: unknown once forgotten, no table needed
    replica.state.key_cache.put(key, Principal("key", frozenset({"ingest"}), None, "key_gw"))
    conn = _Conn(lean)
    try:
        conn.send(_check('{"tenant_id": "t-open"}', key))
        assert b'"spend_usd":"0"' in conn.reply().body
        # Changes written to the pipe as the main process writes them (not applied yet).
        usage = {(("t-open", None), period_of(replica.now)): {"e1": [8_000_000, 0, 0]}}
        replica.primary.attach_mirror(None)
        replica.primary.attach_mirror(lambda change: _write(replica, change))
        replica.primary.durable(1, usage)
        conn.send(_check('{"tenant_id": "t-open"}', key))
        assert b'"spend_usd":"2"' in conn.reply().body
        _write(replica, ("forget_key", "key_gw"))
        calls = counting.calls
        conn.send(_check('{"tenant_id": "t-open"}', key))
        reply = conn.reply()
        assert reply.status == 401 and counting.calls == calls + 1  # looked up: revoked
    finally:
        conn.close()


def _write(replica: _Replica, change: Any) -> None:
    """A change framed as the main process writes it to the pipe."""
    data = pickle.dumps(change)
    os.write(replica.write_fd, len(data).to_bytes(4, "big") + data)
