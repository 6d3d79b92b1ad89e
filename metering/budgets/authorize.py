"""`POST /v1/authorize`: the answer, and the plain ASGI path that serves it.

The gateway calls authorize before every rerank request, while it also posts events, so
the answer must not wait behind ingest. On the event loop each request costs what the
code in front of the route costs: FastAPI's stack (error and telemetry middleware, the
router, request objects, dependency solving) was most of it, and under ingest every
microsecond the loop holds the GIL is one more chance to wait for it. `AuthorizeFastPath`
therefore answers `POST /v1/authorize` before FastAPI sees it: the headers are read from
the ASGI scope, the body is read whole (at most MAX_JSON_BODY bytes, else 413 and close),
and the answer comes from the in-memory spend ledger only. It counts itself in the same
`/metrics` series the metrics middleware keeps for every other route.

The FastAPI route in metering.budgets.routes stays: it documents the endpoint in the
OpenAPI schema and answers through the same `answer` if the fast path is not installed.
Both give the same statuses, bodies and headers, errors in the contract's shape.
"""

from __future__ import annotations

import logging
import re
import time
from decimal import Decimal
from typing import Any, Protocol, cast

import msgspec
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.budgets.forecast import period_of
from billing.budgets.ledger import Limit
from billing.rating import money
from metering import metrics
from metering.auth.deps import AuthState, principal_of
from metering.auth.service import Principal
from metering.budgets.runtime import BudgetRuntime
from metering.errors import ApiError, error_response, too_large
from metering.http.protocol import CLIENT_GONE, CLOSED_STATUS, MAX_JSON_BODY
from metering.ingest.spool import Unavailable
from metering.ingest.structs import ACCOUNT_PATTERN

log = logging.getLogger(__name__)

PATH = "/v1/authorize"


class AuthorizeState(AuthState, Protocol):
    """What authorize needs of the running service."""

    budgets: BudgetRuntime


class _AuthorizeBody(msgspec.Struct):
    tenant_id: str
    project_id: str | None = None


_decoder = msgspec.json.Decoder(_AuthorizeBody)
_encoder = msgspec.json.Encoder()
_ACCOUNT = re.compile(ACCOUNT_PATTERN)
_AT = re.compile(r"^(?P<rule>.*?)(?: - at `\$\.?(?P<field>[A-Za-z_]*)`)?$")


def ready(runtime: BudgetRuntime) -> BudgetRuntime:
    """The runtime, once its ledger has been built from ClickHouse (else 503)."""
    if not runtime.ledger.ready:
        raise Unavailable("budgets: spend is being rebuilt from ClickHouse; retry")
    return runtime


def parse_body(raw: bytes) -> _AuthorizeBody:
    """The body, checked as the AuthorizeIn schema says (msgspec: the hot path)."""
    try:
        body = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        m = _AT.match(str(exc))
        field = (m.group("field") if m else "") or "body"
        rule = m.group("rule") if m else str(exc)
        if rule.startswith("Object missing required field"):
            field, rule = rule.split("`")[1], "field required"
        raise ApiError(400, f"{field}: {rule}") from None
    except msgspec.DecodeError:
        raise ApiError(400, "body: not valid JSON") from None
    except UnicodeDecodeError:
        raise ApiError(400, "body: not valid JSON (strings must be UTF-8)") from None
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deeply") from None
    errors = []
    for name in ("tenant_id", "project_id"):
        value = getattr(body, name)
        if value is None:
            continue
        if not 1 <= len(value) <= 64 or not _ACCOUNT.match(value):
            errors.append(f"{name}: must be 1-64 characters of [A-Za-z0-9_.:-]")
    if errors:
        raise ApiError(400, errors)
    return body


async def answer(state: AuthorizeState, authorization: str, raw: bytes) -> bytes:
    """The JSON answer for a caller (`Authorization` header) and a request body. Raises
    ApiError (401, 403, 400) or Unavailable (503) as the route answers them."""
    return answer_for(state.budgets, await principal_of(state, authorization), raw)


def answer_for(budgets: BudgetRuntime, principal: Principal, raw: bytes) -> bytes:
    """`answer` once the caller is known: synchronous, from memory only."""
    if not (principal.has("ingest") or principal.has("admin")):
        raise ApiError(403, "authorization: this key lacks the ingest or admin scope")
    body = parse_body(raw)
    runtime = ready(budgets)
    checks = runtime.ledger.check(body.tenant_id, body.project_id)
    reason = None
    for c in checks:
        if c.limit.hard_limit and c.exhausted:
            reason = _reason(c.limit, c.spend, period_of(runtime.now()))
            break
    return _encoder.encode(
        {
            "allowed": reason is None,
            "reason": reason,
            "budgets": [
                {
                    "id": c.limit.id,
                    "spend_usd": money(c.spend),
                    "amount_usd": money(c.limit.amount),
                    "remaining_usd": money(c.remaining),
                }
                for c in checks
            ],
        }
    )


def _reason(limit: Limit, spend: Decimal, period: str) -> str:
    scope = f"project {limit.project_id}" if limit.project_id else f"tenant {limit.tenant_id}"
    return (
        f"budget {limit.id} ({scope}): spend {money(spend)} USD has reached its hard limit"
        f" of {money(limit.amount)} USD for {period}"
    )


class _Gone(Exception):
    """The client went away before its body was complete."""


_JSON_HEADERS = [(b"content-type", b"application/json")]


class AuthorizeFastPath:
    """Answers `POST /v1/authorize` ahead of FastAPI; everything else (other methods on
    the path too: 405 with Allow) goes on to `app`. Install it outermost."""

    def __init__(self, app: ASGIApp, *, count: bool = True) -> None:
        """`count=False`: no metrics (a process whose /metrics nobody reads)."""
        self.app = app
        self.count = count
        self._ok = metrics.HTTP_REQUESTS.labels(PATH, "POST", "200")
        self._latency = metrics.HTTP_LATENCY.labels(PATH, "POST")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if not self.count:
            await self._serve(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        try:
            status = await self._serve(scope, receive, send)
        finally:
            label = scope.get(CLOSED_STATUS, status)
            if label == 200:
                self._ok.inc()
            else:
                metrics.HTTP_REQUESTS.labels(PATH, "POST", str(label)).inc()
            self._latency.observe(time.perf_counter() - started)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> int:
        authorization = b""
        declared = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                declared = value
        if declared.isdigit() and int(declared) > MAX_JSON_BODY:
            return await _too_large(scope, receive, send)
        try:
            raw = await _body(receive)
        except _Gone:
            return CLIENT_GONE
        if raw is None:
            return await _too_large(scope, receive, send)
        try:
            payload = await answer(
                cast(AuthorizeState, scope["app"].state.services),
                authorization.decode("latin-1"),
                raw,
            )
        except ApiError as exc:
            return await _error(scope, receive, send, exc.status, exc.errors, exc.headers)
        except Unavailable as exc:
            return await _error(scope, receive, send, 503, str(exc), {"Retry-After": "1"})
        except DBAPIError:
            reason = "database: unreachable; retry"
            return await _error(scope, receive, send, 503, reason, {"Retry-After": "1"})
        except Exception:
            log.exception("POST %s failed", PATH)
            return await _error(scope, receive, send, 500, "server: internal error", None)
        headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return 200


async def _body(receive: Receive) -> bytes | None:
    """The whole body, or None past MAX_JSON_BODY bytes. Raises _Gone on a disconnect."""
    message: Message = await receive()
    if message["type"] != "http.request":
        raise _Gone()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= MAX_JSON_BODY else None
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Gone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_JSON_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _error(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    errors: Any,
    headers: Any,
) -> int:
    await error_response(status, errors, headers)(scope, receive, send)
    return status


async def _too_large(scope: Scope, receive: Receive, send: Send) -> int:
    await too_large(MAX_JSON_BODY)(scope, receive, send)
    return 413
