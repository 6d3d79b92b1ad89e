"""uvicorn's httptools protocol with the limits a server facing the network needs.

Stock uvicorn (0.54, httptools) bounds neither the request header nor the time a
connection may take: httptools buffers an unfinished header without limit (8 connections
sending 64 MiB each held 512 MiB), a connection that never sends a request stays open
forever, and so does a trickled header (slowloris) or a body that stops after its
Content-Length was announced. This subclass adds, per connection:

- a header limit (`max_header_bytes`): once the bytes of an unfinished request head exceed
  it, the server answers 431 and closes, dropping the parser and what it buffered;
- the keep-alive timeout also before the first request (stock arms it only after a
  response), so an idle connection is closed;
- a header deadline (`header_timeout_seconds`) counted from the request's first byte:
  408 and close when the head is not complete by then;
- a body stall timeout (`body_timeout_seconds`): 408 and close when no body byte arrived
  for that long while the server was willing to read (time the server itself stopped
  reading, by flow control or before a `100 Continue`, does not count).

The per-request cost has to stay negligible (ingest runs ~150 requests/s of 1,000 events
each on one event loop), so nothing here arms a timer per request or per chunk: each chunk
records the loop time and adds to a counter; one lazy timer per connection fires at the
earliest possible deadline, re-reads the state and re-arms itself for what is left, and
stays armed across keep-alive requests instead of being cancelled and re-created.

When a connection closes before its response was complete, the request's ASGI scope gets
`CLOSED_STATUS`: 499 (the client went away) or 408 (the server timed the body out), which
the metrics middleware reports instead of whatever the app tried to answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import httptools
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

if TYPE_CHECKING:
    from metering.settings import Settings

# Scope key: the status the metrics should report for a request whose connection closed
# before its response was complete (the app's answer never reached the client).
CLOSED_STATUS = "metering.closed_status"
CLIENT_GONE = 499  # nginx's "client closed request"
# Every request body the app reads whole (all but the ingest endpoints', 16 MiB, streamed).
MAX_JSON_BODY = 1024 * 1024

_IDLE, _HEAD, _BODY = 0, 1, 2  # where the connection is in the current request
_SLACK = 0.001  # timers may fire up to a millisecond early (libuv's resolution)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Limits per connection (from the METERING_HTTP_* settings)."""

    max_header_bytes: int = 64 * 1024
    keep_alive_seconds: float = 5.0
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 15.0

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            keep_alive_seconds=settings.http_keep_alive_seconds,
            header_timeout_seconds=settings.http_header_timeout_seconds,
            body_timeout_seconds=settings.http_body_timeout_seconds,
        )

    @property
    def first_check_seconds(self) -> float:
        """When the timer of a connection that just began a request first looks."""
        return min(self.header_timeout_seconds, self.body_timeout_seconds)


def _mark(scope: Scope, status: int) -> None:
    cast(dict[str, Any], scope).setdefault(CLOSED_STATUS, status)


def _plain_response(status: int, message: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = message.encode("ascii")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"connection", b"close"),
    ]
    return body, headers


async def _header_too_large(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """The app a request with an oversized head gets instead of ours (as uvicorn's own
    `service_unavailable` for its concurrency limit): 431, then the connection closes."""
    body, headers = _plain_response(431, "request header fields too large")
    await send({"type": "http.response.start", "status": 431, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# The stock methods our overrides extend, called directly: `super()` costs more, and these
# run for every request and chunk.
_stock_data_received = HttpToolsProtocol.data_received
_stock_on_message_begin = HttpToolsProtocol.on_message_begin
_stock_on_headers_complete = HttpToolsProtocol.on_headers_complete
_stock_on_message_complete = HttpToolsProtocol.on_message_complete


class _FlowControl(FlowControl):
    """uvicorn's read/write flow control, telling the protocol when reading resumes: the
    body stall clock restarts then (the client could not send while we were not reading)."""

    def __init__(self, transport: asyncio.Transport, protocol: LimitedHttpToolsProtocol) -> None:
        super().__init__(transport)
        self._protocol = protocol

    def resume_reading(self) -> None:
        if self.read_paused:
            super().resume_reading()
            self._protocol.reading_resumed()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header limit and timeouts; see the module docstring.

    Use `protocol_class(limits)` to get a subclass bound to given limits: uvicorn builds
    one protocol per connection from the class alone.
    """

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_seconds  # type: ignore[assignment]
        self._phase = _IDLE
        self._max_head = self.limits.max_header_bytes
        self._head_bytes = 0  # bytes received since the current head began (or before)
        self._head_started = 0.0  # loop time of the chunk that began the current request
        self._last_data = 0.0  # loop time of the latest chunk (or of resumed reading)
        self._deadline: asyncio.TimerHandle | None = None
        self._was_expecting = False  # the last look saw a client wait for 100 Continue

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _FlowControl(transport, self)
        # Stock uvicorn arms the keep-alive timeout only after a response.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            _mark(cycle.scope, CLIENT_GONE)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        if self._phase != _BODY:
            self._head_bytes += len(data)
        _stock_data_received(self, data)
        phase = self._phase
        if phase == _IDLE:
            return
        if phase == _HEAD and self._head_bytes > self._max_head:
            self._refuse(431, "request header fields too large")
        elif self._deadline is None and not self.transport.is_closing():
            self._arm(self.limits.first_check_seconds)

    def reading_resumed(self) -> None:
        self._last_data = self.loop.time()

    def handle_websocket_upgrade(self) -> None:
        self._phase = _IDLE  # the websocket protocol takes the connection over
        super().handle_websocket_upgrade()

    # Parser callbacks (each adds a store to the stock one)

    def on_message_begin(self) -> None:
        self._phase = _HEAD
        self._head_started = self._last_data
        _stock_on_message_begin(self)

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        # Chunks that end a head often carry body bytes too: only then measure the head.
        oversized = self._head_bytes > self._max_head and self._head_size() > self._max_head
        self._head_bytes = 0
        if not oversized:
            self.begin_request()
            return
        app, self.app = self.app, _header_too_large
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def begin_request(self) -> None:
        """A request's head is complete (and within the limit): start the app on it. A
        subclass may answer some requests itself instead (metering.budgets.replica_http)."""
        _stock_on_headers_complete(self)

    def _head_size(self) -> int:
        """The head's size, give or take the request line's spaces and version."""
        return len(self.url) + 16 + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        _stock_on_message_complete(self)

    # The lazy timer

    def _arm(self, delay: float) -> None:
        self._deadline = self.loop.call_later(delay, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._phase == _HEAD:
            left = self._head_started + self.limits.header_timeout_seconds - now
        elif self._phase == _BODY:
            cycle = self.cycle
            expecting = cycle is not None and cycle.waiting_for_100_continue
            if self.flow.read_paused or expecting or self._was_expecting:
                # We are not reading, or the client waits for (or was waiting at the last
                # look, and has just got) its 100 Continue: it cannot be stalling.
                self._last_data = now
            self._was_expecting = expecting
            left = self._last_data + self.limits.body_timeout_seconds - now
        else:
            return  # between requests: the keep-alive timeout watches
        if left > _SLACK:
            self._arm(left)
        else:
            self._refuse(408, "request timeout")

    # Refusing

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` unless another response is under way on this connection, close
        the connection and drop what the parser holds. When an app waits for the body, its
        request's scope is marked with `status` and its receive() says the client is gone."""
        cycle = self.cycle
        if self._phase == _BODY and cycle is not None:  # the body of `cycle`'s request
            answer = not cycle.response_started and not self.pipeline
            if not cycle.response_complete:
                _mark(cycle.scope, status)
                cycle.disconnected = True
                cycle.message_event.set()
        else:  # a head: no app runs for it yet
            answer = not self.pipeline and (cycle is None or cycle.response_complete)
        if answer:
            self._write_error(status, message)
        self.transport.close()
        self._phase = _IDLE
        self.parser = httptools.HttpRequestParser(self)  # frees the buffered header bytes
        self.url = b""
        self.headers = []

    def _write_error(self, status: int, message: str) -> None:
        body, headers = _plain_response(status, message)
        content = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers]:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"\r\n", body])
        self.transport.write(b"".join(content))


def protocol_class(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class bound to `limits`, to pass as uvicorn's `http=`."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
