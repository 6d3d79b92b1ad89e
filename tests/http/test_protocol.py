"""The server under abuse: huge headers, idle and slow connections, stalled bodies.

Real sockets against a real uvicorn (uvloop + our httptools protocol) on loopback, with the
short limits of tests.http.helpers.SHORT. A well-behaved keep-alive client must not notice
any of it.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
from contextlib import ExitStack
from typing import Any

import pytest

from tests.http.helpers import (
    SHORT,
    WAIT,
    connect,
    read_response,
    read_responses,
    read_until_closed,
    rss_bytes,
    serving,
)

MiB = 1024 * 1024


class EchoApp:
    """Reads the whole body and answers its length; /slow-reader first sleeps 1 s."""

    def __init__(self) -> None:
        self.disconnects = 0
        self.requests = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.requests += 1
        if scope["path"] == "/slow-reader":
            await asyncio.sleep(1.0)
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            size += len(message["body"])
            more = message["more_body"]
        body = str(size).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _send_until_refused(sock: socket.socket, data: memoryview) -> bool:
    """Send `data`; False once the server has closed the connection on us."""
    try:
        for start in range(0, len(data), 256 * 1024):
            sock.sendall(data[start : start + 256 * 1024])
    except (BrokenPipeError, ConnectionResetError):
        return False
    except TimeoutError:  # the server stopped reading: it refused the header
        return False
    return True


def test_unfinished_huge_header_is_refused_and_not_buffered() -> None:
    """4 connections each send 16 MiB of one header line that never ends. Each is refused
    (431, or a close) once past the limit, and the server does not hold the bytes: the
    process grows by far less than the 64 MiB sent (stock httptools keeps them all)."""
    header = memoryview(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (16 * MiB))
    app = EchoApp()
    with serving(app) as running:
        before = rss_bytes()
        with ExitStack() as stack:
            sockets = [stack.enter_context(connect(running.port)) for _ in range(4)]
            for sock in sockets:
                _send_until_refused(sock, header)
            grown = rss_bytes() - before
            assert grown < 16 * MiB, f"the server holds {grown / MiB:.0f} MiB of headers"
            answers = [read_until_closed(sock) for sock in sockets]
    for answer in answers:
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    assert any(answer.startswith(b"HTTP/1.1 431 ") for answer in answers)
    assert app.requests == 0


def test_header_at_the_limit_is_served_and_one_past_it_is_refused() -> None:
    app = EchoApp()
    with serving(app) as running:
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: "
        fits = head + b"a" * (SHORT.max_header_bytes - len(head) - 4) + b"\r\n\r\n"
        assert len(fits) == SHORT.max_header_bytes
        with connect(running.port) as sock:
            sock.sendall(fits)
            assert read_response(sock) == (200, b"0")
        with connect(running.port) as sock:
            sock.sendall(head + b"a" * SHORT.max_header_bytes + b"\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")


def test_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    """A connection that never sends a byte (stock uvicorn keeps it forever)."""
    with serving(EchoApp()) as running, connect(running.port) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - started >= SHORT.keep_alive_seconds * 0.9


def test_slowloris_header_is_answered_408_and_closed() -> None:
    """A header trickled one line every 0.1 s never completes: the header deadline is
    counted from its first byte, not reset by each byte."""
    app = EchoApp()
    with serving(app) as running, connect(running.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + WAIT
        answer = b""
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            break
        else:
            raise AssertionError("the slow header was never refused")
        answer += read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert app.requests == 0


def test_stalled_body_is_answered_408_and_closed() -> None:
    """Content-Length announced, 10 bytes sent, then nothing: 408, close, and the app's
    receive() sees the disconnect."""
    app = EchoApp()
    with serving(app) as running, connect(running.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        deadline = time.monotonic() + WAIT
        while app.disconnects == 0:
            assert time.monotonic() < deadline, "the app never saw the disconnect"
            time.sleep(0.01)


def test_body_that_keeps_flowing_is_not_timed_out() -> None:
    """A slow body (a chunk every 0.2 s, 1.6 s in all) is not a stalled one."""
    with serving(EchoApp()) as running, connect(running.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
        for _ in range(8):
            time.sleep(0.2)
            sock.sendall(b"x")
        assert read_response(sock) == (200, b"8")


def test_app_slow_to_read_a_large_body_is_not_a_client_stall() -> None:
    """The app sleeps 1 s (twice the body timeout) before reading a 4 MiB body: the server
    stops reading meanwhile (flow control), which is not the client stalling."""
    size = 4 * MiB
    with serving(EchoApp()) as running, connect(running.port) as sock:
        head = f"POST /slow-reader HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
        sock.sendall(head.encode() + b"x" * size)
        assert read_response(sock) == (200, str(size).encode())


def test_client_waiting_for_100_continue_is_not_a_stall() -> None:
    """`Expect: 100-continue`: the client sends no body until the app asks for it (here
    after 1 s, twice the body timeout), then takes 0.2 s to start: neither is a stall."""
    with serving(EchoApp()) as running, connect(running.port) as sock:
        sock.sendall(
            b"POST /slow-reader HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(1)
            assert chunk, "closed instead of 100 Continue"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        time.sleep(0.2)
        sock.sendall(b"abcd")
        assert read_response(sock) == (200, b"4")


def test_keep_alive_client_works_across_requests_and_pauses() -> None:
    """One connection, 20 requests, with pauses longer than the header and body timeouts
    but shorter than the keep-alive timeout: every request answered, one connection."""
    app = EchoApp()
    with serving(app) as running:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=WAIT)
        for i in range(20):
            if i % 5 == 4:
                time.sleep(SHORT.header_timeout_seconds * 1.4)
            body = b"y" * (i * 1000)
            conn.request("POST", "/", body=body)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, str(len(body)).encode())
        first = conn.sock
        conn.request("GET", "/")
        conn.getresponse().read()
        assert conn.sock is first, "the connection was not kept alive"
        assert running.connections == 1
        conn.close()
    assert app.requests == 21


def test_pipelined_requests_are_answered_in_order() -> None:
    with serving(EchoApp()) as running, connect(running.port) as sock:
        request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        sock.sendall(request % 3 + b"abc" + request % 5 + b"abcde")
        assert read_responses(sock, 2) == [(200, b"3"), (200, b"5")]


@pytest.mark.parametrize("status", [408, 431])
def test_refusals_close_the_connection(status: int) -> None:
    """After a 408 or 431 the connection is gone (no second request on it)."""
    with serving(EchoApp()) as running, connect(running.port) as sock:
        if status == 431:
            sock.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * (SHORT.max_header_bytes + 1))
        else:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
        assert b"connection: close" in answer.lower()
