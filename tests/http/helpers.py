"""A real uvicorn server on loopback (in a thread of the test process) and raw-socket clients.

The server runs as `metering serve` runs it (uvloop, our httptools protocol), with
`log_config=None` so uvicorn's log records reach pytest's caplog. Every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from metering.http.protocol import HttpLimits, protocol_class

# Short limits so that the timeout tests take a second, not a minute.
SHORT = HttpLimits(
    max_header_bytes=64 * 1024,
    keep_alive_seconds=1.0,
    header_timeout_seconds=0.5,
    body_timeout_seconds=0.5,
)
WAIT = 5.0  # the bound of every socket read in these tests


@dataclass
class Running:
    server: uvicorn.Server
    port: int

    @property
    def connections(self) -> int:
        return len(self.server.server_state.connections)


@contextmanager
def serving(app: Any, limits: HttpLimits = SHORT, *, lifespan: str = "off") -> Iterator[Running]:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        loop="uvloop",
        http=protocol_class(limits),
        lifespan=lifespan,  # type: ignore[arg-type]
        log_config=None,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Running(server, port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.settimeout(WAIT)
    return sock


def read_until_closed(sock: socket.socket, within: float = WAIT) -> bytes:
    """Everything the server sends until it closes; fails if it keeps the socket open."""
    data = b""
    deadline = time.monotonic() + within
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open for {within} s (got {data[:80]!r})"
            ) from None
        if not chunk:
            return data
        data += chunk


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """`count` responses with Content-Length bodies: [(status, body)]; nothing more."""
    data = b""
    responses: list[tuple[int, bytes]] = []
    while len(responses) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed before a response ({data!r})"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(data) < length:
            chunk = sock.recv(65536)
            assert chunk, "closed inside a response body"
            data += chunk
        responses.append((int(lines[0].split()[1]), data[:length]))
        data = data[length:]
    assert data == b"", f"more bytes than {count} response(s)"
    return responses


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    return read_responses(sock, 1)[0]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
