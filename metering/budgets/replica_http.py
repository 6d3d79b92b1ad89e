"""The authorize replica's HTTP protocol: a check answered without an ASGI task.

On a busy machine a check's tail is its wait for a core, and every microsecond of CPU it
takes adds to it (bench/RESULTS.md). Through uvicorn's ASGI path a check cost the replica
about 110-150 us of CPU: a scope, a request/response cycle, an asyncio task, `receive` and
two `send`s. Most checks need none of that: the caller's key was resolved lately (the key
cache), the body is small, and the answer comes from memory. `ReplicaProtocol` answers
those itself, from the parser's callbacks, in the order they arrive:

- at the end of a `POST /v1/authorize` head it catches up with the main process (as
  `ReplicaApp` does before every request), and if the key is in the cache, or the token
  was found lately to be no key (401), it collects the body (at most MAX_JSON_BODY bytes,
  else 413 and close, as on the main port);
- at the end of the body it writes the answer: `answer_for`, the same function the main
  port uses, or the same error in the contract's shape (rendered from the same
  `error_response`), with uvicorn's default headers, so the bytes are those the ASGI path
  would write.

Everything else goes the ASGI way, unchanged: other paths and methods, a token neither in
the cache nor known to be no key (a database lookup, or 401), `Expect: 100-continue`,
upgrades, a request pipelined behind one still in the ASGI path (answers keep their
order), and a client that does not read its answers (the transport's write buffer is past
its high-water mark: the ASGI path waits for it to drain and stops reading meanwhile). The
connection limits and timeouts of `LimitedHttpToolsProtocol` apply to both: a body that
stalls gets 408, a head past the limit 431.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from metering.auth.deps import cached_principal, known_unknown, unknown_token
from metering.auth.service import Principal
from metering.budgets.authorize import PATH, answer_for
from metering.errors import ApiError, error_response, too_large
from metering.http.protocol import _IDLE, MAX_JSON_BODY, HttpLimits, LimitedHttpToolsProtocol
from metering.ingest.spool import Unavailable

log = logging.getLogger(__name__)

_PATH = PATH.encode()
_stock_begin_request = LimitedHttpToolsProtocol.begin_request
_stock_on_body = HttpToolsProtocol.on_body
_limited_on_message_complete = LimitedHttpToolsProtocol.on_message_complete
_limited_data_received = LimitedHttpToolsProtocol.data_received
_JSON_200 = STATUS_LINE[200]
_BEHIND = "authorize: catching up with the main process; retry"


class ReplicaProtocol(LimitedHttpToolsProtocol):
    """See the module docstring. `replica_protocol_class` binds `replica`: the
    `ReplicaApp` whose state and mirror the answers come from."""

    replica: ClassVar[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast = False  # the current request is answered here
        self._principal: Principal | None = None
        self._behind = False  # catching up failed: the answer is 503
        self._dropped = False  # answered early (413) or closing: the rest is ignored
        self._keep_alive = True
        self._chunks: list[bytes] = []
        self._size = 0
        self._answered = False  # an answer went out during this data_received

    # Parser callbacks

    def begin_request(self) -> None:
        cycle = self.cycle
        if (
            self.url != _PATH
            or self.parser.get_method() != b"POST"
            or self.expect_100_continue
            or self.pipeline
            or (cycle is not None and not cycle.response_complete)
            or self.flow.write_paused
            or self.parser.should_upgrade()
        ):
            _stock_begin_request(self)
            return
        authorization = b""
        declared = b""
        for name, value in self.headers:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                declared = value
        replica = self.replica
        behind = not replica.mirror.catch_up()
        principal = None
        if not behind:
            services = replica.state.services
            header = authorization.decode("latin-1")
            principal = cached_principal(services, header)
            if principal is None and not known_unknown(services, header):
                # a database lookup, or a 401 for a missing token: the ASGI path's work
                _stock_begin_request(self)
                return
        self._fast = True
        self.cycle = None  # type: ignore[assignment]  # no ASGI cycle for this request
        self._principal = principal  # None: a token found to be no key lately (401)
        self._behind = behind
        self._dropped = self.transport.is_closing()
        self._keep_alive = (
            self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        )
        self._chunks = []
        self._size = 0
        if declared.isdigit() and int(declared) > MAX_JSON_BODY:
            self._refuse_too_large()

    def on_body(self, body: bytes) -> None:
        if not self._fast:
            _stock_on_body(self, body)
            return
        if self._dropped:
            return
        self._size += len(body)
        if self._size > MAX_JSON_BODY:
            self._refuse_too_large()
            return
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if not self._fast:
            _limited_on_message_complete(self)
            return
        self._phase = _IDLE
        self._fast = False
        if self._dropped:
            return
        raw = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        self.server_state.total_requests += 1
        if self._behind:
            self._write_response(error_response(503, _BEHIND, {"Retry-After": "1"}))
        elif self._principal is None:
            self._write_api_error(unknown_token())
        else:
            try:
                payload = answer_for(self.replica.state.services.budgets, self._principal, raw)
            except ApiError as exc:
                self._write_api_error(exc)
            except Unavailable as exc:
                self._write_response(error_response(503, str(exc), {"Retry-After": "1"}))
            except Exception:
                log.exception("POST %s failed", PATH)
                self._write_response(error_response(500, "server: internal error"))
            else:
                self._write_ok(payload)
        if self._keep_alive:
            self._answered = True
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        _limited_data_received(self, data)
        if self._answered:
            # As uvicorn does after a response: between requests the keep-alive timeout
            # watches (armed once the chunk is parsed: a request begun in it has its own).
            self._answered = False
            if (
                self._phase == _IDLE
                and self.timeout_keep_alive_task is None
                and not self.transport.is_closing()
            ):
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    # Answers

    def _write_ok(self, payload: bytes) -> None:
        content = [_JSON_200]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\ncontent-length: ",
                str(len(payload)).encode(),
                b"\r\n" if self._keep_alive else b"\r\nconnection: close\r\n",
                b"\r\n",
                payload,
            ]
        )
        self.transport.write(b"".join(content))

    def _write_api_error(self, exc: ApiError) -> None:
        self._write_response(error_response(exc.status, exc.errors, exc.headers))

    def _write_response(self, response: Response) -> None:
        """`response` as uvicorn would write it for this request."""
        content = [STATUS_LINE[response.status_code]]
        closes = False
        for name, value in [*self.server_state.default_headers, *response.raw_headers]:
            if name == b"connection" and b"close" in value.lower():
                closes = True
            content.extend([name, b": ", value, b"\r\n"])
        if closes:
            self._keep_alive = False
        elif not self._keep_alive:
            content.append(b"connection: close\r\n")
        content.extend([b"\r\n", bytes(response.body)])
        self.transport.write(b"".join(content))

    def _refuse_too_large(self) -> None:
        """413 and close, as the main port does: the rest of the body is not read."""
        self._dropped = True
        self.server_state.total_requests += 1
        self._write_response(too_large(MAX_JSON_BODY))
        self.transport.close()


def replica_protocol_class(limits: HttpLimits, replica: Any) -> type[ReplicaProtocol]:
    """A protocol class bound to `limits` and `replica`, to pass as uvicorn's `http=`."""
    return type("ReplicaProtocol", (ReplicaProtocol,), {"limits": limits, "replica": replica})
