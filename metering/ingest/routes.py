"""POST /v1/events and POST /v1/probes: the gateway's ingest endpoints.

The body is read raw and decoded by msgspec (see metering.ingest.decode); FastAPI's
own body parsing is skipped on this path because it is ~3x slower. A small batch that
is fully valid is decoded and submitted (dedup gate, spool) on the event loop; a large,
compressed or invalid one in a small dedicated thread pool, which also submits it and
frees its items, so neither a hostile body nor a valid 10 MB one freezes the loop (it
only awaits the spool write). Bodies held at once (read + decompressed) share a
process-wide byte budget (METERING_INGEST_BODY_BUDGET_BYTES). A 202 is sent only after
the accepted items are in the spool (and fsync'd when METERING_SPOOL_FSYNC is "always"),
so it means the items are durable.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Annotated, Any, Protocol, cast

import msgspec
from fastapi import APIRouter, Depends, Request, Response
from starlette.requests import ClientDisconnect

from metering.auth.deps import Ingest
from metering.errors import error_response, error_responses
from metering.ingest.decode import (
    EVENTS,
    INLINE_MAX_BYTES,
    PAUSE_SECONDS,
    PROBES,
    BodyError,
    Decoded,
    StreamSchema,
    TooLarge,
    decode_batch,
    decode_fast,
)
from metering.ingest.pipeline import StreamPipeline, SubmitResult
from metering.ingest.spool import SpoolFull, Unavailable
from metering.ingest.structs import MAX_BATCH_EVENTS, MAX_BODY_BYTES, Event, Probe
from metering.settings import Settings

router = APIRouter(prefix="/v1", tags=["ingest"])


class IngestState(Protocol):
    """What the ingest routes need of the running service (`metering.services.Services`
    provides it; the routes do not import the composition root)."""

    settings: Settings
    events: StreamPipeline[Event]
    probes: StreamPipeline[Probe]
    ready: bool


async def _state(request: Request) -> IngestState:
    # Async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a
    # thread hop per request (~6% of the loop's time on 1,000-event batches).
    return cast(IngestState, request.app.state.services)


IngestStateDep = Annotated[IngestState, Depends(_state)]

_encoder = msgspec.json.Encoder()
RETRY_AFTER_SECONDS = "5"
BUSY_RETRY_AFTER_SECONDS = "1"
# How long a request waits for its share of the body budget before answering 503.
BUDGET_WAIT_SECONDS = 1.0
DECODE_THREADS = 1  # bodies decoded off the loop at once (more wait their turn)
GUNZIP_STEP = 1024 * 1024
FREE_STEP = 500  # items of a large batch freed per step in the decode thread
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up mid-request
_TOO_LARGE = f"body: must be at most {MAX_BODY_BYTES} bytes (16 MiB)"
_NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/jsonlines")


class BodyBudget:
    """Bytes of request bodies held at once across the process (read + decompressed).

    64 concurrent 16 MiB bodies once took RSS to 1.6 GB; with a budget a request that
    cannot get its share waits briefly, then gets 503 with Retry-After. A request alone
    always gets its share, so a budget below 16 MiB cannot refuse every large body.
    Thread-safe: the decode threads take the decompressed bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def try_take(self, size: int) -> bool:
        with self._lock:
            if self.used and self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.used -= size

    async def take(self, size: int, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while not self.try_take(size):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def take_blocking(self, size: int, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while not self.try_take(size):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True


class _Busy(Exception):
    """The body budget is exhausted (503)."""


class _Hold:
    """What one request took from the budget (given back when the request ends)."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0
        self._lock = threading.Lock()

    async def take(self, size: int) -> bool:
        if not await self.budget.take(size, BUDGET_WAIT_SECONDS):
            return False
        with self._lock:
            self.size += size
        return True

    def take_blocking(self, size: int) -> bool:
        if not self.budget.take_blocking(size, BUDGET_WAIT_SECONDS):
            return False
        with self._lock:
            self.size += size
        return True

    def release(self) -> None:
        with self._lock:
            size, self.size = self.size, 0
        self.budget.give_back(size)


def _budget(request: Request, limit: int) -> BodyBudget:
    state = request.app.state
    budget: BodyBudget | None = getattr(state, "ingest_body_budget", None)
    if budget is None:
        budget = state.ingest_body_budget = BodyBudget(limit)
    return budget


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    """A small dedicated pool: large bodies never run on the event loop, and at most
    DECODE_THREADS decode at once (the default pool is shared with sync routes)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="ingest-decode")
        return _pool


def gunzip(data: bytes, take: Any = None) -> bytes:
    """Decompress a gzip body in steps of GUNZIP_STEP, never past MAX_BODY_BYTES (a
    bomb is refused after 16 MiB of output). `take(n)` reserves output bytes in the
    budget; False means 503."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    parts: list[bytes] = []
    size = 0
    pending = data
    try:
        while not inflater.eof:
            part = inflater.decompress(pending, GUNZIP_STEP)
            pending = inflater.unconsumed_tail
            size += len(part)
            if size > MAX_BODY_BYTES:
                raise TooLarge(f"{_TOO_LARGE} once decompressed")
            if take is not None and part and not take(len(part)):
                raise _Busy()
            parts.append(part)
            if not part and not pending:
                break
    except zlib.error as exc:
        raise BodyError(f"body: not valid gzip ({exc})") from None
    if not inflater.eof:
        raise BodyError("body: not valid gzip (the stream is truncated)")
    if inflater.unused_data.strip(b"\x00"):
        raise BodyError("body: not valid gzip (data after the compressed stream)")
    return b"".join(parts)


def _busy() -> Response:
    return error_response(
        503,
        "body: too many request bodies in flight; retry after Retry-After",
        {"Retry-After": BUSY_RETRY_AFTER_SECONDS},
    )


async def _read_body(request: Request, hold: _Hold) -> bytes | Response:
    declared = request.headers.get("content-length")
    expected = int(declared) if declared is not None and declared.isdigit() else None
    if expected is not None:
        if expected > MAX_BODY_BYTES:
            return error_response(413, _TOO_LARGE)
        if not await hold.take(expected):
            return _busy()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return error_response(413, _TOO_LARGE)
        if (expected is None or size > expected) and not await hold.take(len(chunk)):
            return _busy()
        chunks.append(chunk)
    return b"".join(chunks)


# Submitted: the batch went through the gate into the spool (None: the service is starting).
Admit = Callable[[Decoded[Any]], SubmitResult | None]


def _admit(
    pipeline: StreamPipeline[Any], services: IngestState, decoded: Decoded[Any]
) -> SubmitResult | None:
    """Gate + spool write of a decoded batch, once the service is ready."""
    return pipeline.submit(decoded) if services.ready else None


def _decode_in_thread(
    schema: StreamSchema[Any],
    body: bytes,
    ndjson: bool,
    gzipped: bool,
    hold: _Hold,
    fast: bool,
    admit: Admit,
) -> SubmitResult | None:
    """Decode and submit a large batch off the loop. Its items die here too, a slice at
    a time: 10,000 events with their fallbacks are ~170,000 objects, built and freed by
    C calls that hold the GIL (freeing them in one go stalled the loop ~20-40 ms)."""
    if gzipped:
        body = gunzip(body, hold.take_blocking)
    decoded = decode_batch(schema, body, ndjson=ndjson, fast=fast, pause=True)
    items = decoded.items
    try:
        return admit(decoded)
    finally:
        decoded.items = []
        del decoded
        _free(items)


def _free(items: list[Any]) -> None:
    while items:
        del items[-FREE_STEP:]
        time.sleep(PAUSE_SECONDS)


async def _submit(
    request: Request, schema: StreamSchema[Any], hold: _Hold, admit: Admit
) -> SubmitResult | Response | None:
    """Read, decode and submit the body: a small valid batch on the loop (a thread hop
    would cost more than the work), anything else in the decode thread."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip", ""):
        return error_response(415, "content-encoding: must be gzip or identity")
    gzipped = encoding in ("gzip", "x-gzip")
    ndjson = request.headers.get("content-type", "").split(";")[0].strip() in _NDJSON_TYPES
    try:
        body = await _read_body(request, hold)
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(body, Response):
        return body
    try:
        decoded = None
        if not gzipped and len(body) <= INLINE_MAX_BYTES:
            decoded = decode_fast(schema, body, ndjson=ndjson)
        if decoded is not None:
            return admit(decoded)
        fast = gzipped or len(body) > INLINE_MAX_BYTES
        work = partial(_decode_in_thread, schema, body, ndjson, gzipped, hold, fast, admit)
        return await asyncio.get_running_loop().run_in_executor(_decode_pool(), work)
    except TooLarge as exc:
        return error_response(413, str(exc))
    except BodyError as exc:
        return error_response(400, str(exc))
    except _Busy:
        return _busy()
    except (Unavailable, OSError) as exc:
        return _not_spooled(exc)


def _not_spooled(exc: Unavailable | OSError) -> Response:
    if isinstance(exc, SpoolFull):
        message = f"spool: cannot store events now: {exc}"
    elif isinstance(exc, Unavailable):
        message = str(exc)
    else:
        message = f"spool: cannot spool events: {exc}"
    return error_response(503, message, {"Retry-After": RETRY_AFTER_SECONDS})


async def _ingest(
    request: Request,
    pipeline: StreamPipeline[Any],
    schema: StreamSchema[Any],
    services: IngestState,
) -> Response:
    hold = _Hold(_budget(request, services.settings.ingest_body_budget_bytes))
    try:
        result = await _submit(request, schema, hold, partial(_admit, pipeline, services))
    finally:
        hold.release()
    if isinstance(result, Response):
        return result
    if result is None:
        return error_response(
            503,
            "service: starting, applying migrations",
            {"Retry-After": RETRY_AFTER_SECONDS},
        )
    try:
        await pipeline.durable(result)
    except (Unavailable, OSError) as exc:
        return _not_spooled(exc)
    payload = {
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "rejected": [
            {"index": r.index, schema.id_field: r.item_id, "errors": r.errors}
            for r in result.rejected
        ],
    }
    return Response(_encoder.encode(payload), status_code=202, media_type="application/json")


def _request_body(schema: StreamSchema[Any]) -> dict[str, Any]:
    item_list: Any = list[schema.item_type]  # type: ignore[name-defined]
    batch = msgspec.defstruct(f"{schema.name.title()}Body", [(schema.envelope_key, item_list)])
    (_, components) = msgspec.json.schema_components(
        [batch], ref_template="#/components/schemas/{name}"
    )
    body_schema = components[batch.__name__]
    body_schema["properties"][schema.envelope_key]["maxItems"] = MAX_BATCH_EVENTS
    item_schema = components[schema.item_type.__name__]
    return {
        "parameters": [
            {
                "name": "Content-Encoding",
                "in": "header",
                "required": False,
                "description": (
                    "gzip: the body is gzip-compressed; the 16 MiB limit applies to the"
                    " decompressed bytes. Other encodings get 415."
                ),
                # Content codings are case-insensitive (RFC 9110); x-gzip is gzip's
                # old name; an empty value means no coding.
                "schema": {
                    "type": "string",
                    "pattern": (
                        "^([gG][zZ][iI][pP]|[xX]-[gG][zZ][iI][pP]"
                        "|[iI][dD][eE][nN][tT][iI][tT][yY])?$"
                    ),
                },
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _inline(body_schema, components)},
                "application/x-ndjson": {"schema": _inline(item_schema, components)},
            },
        },
    }


def _inline(node: Any, components: dict[str, Any]) -> Any:
    """Replace $refs to msgspec's components by the schemas themselves."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            return _inline(components[ref.rsplit("/", 1)[1]], components)
        return {key: _inline(value, components) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(value, components) for value in node]
    return node


_REJECTED_SCHEMA = {
    "type": "object",
    "required": ["accepted", "duplicates", "rejected"],
    "properties": {
        "accepted": {"type": "integer", "description": "newly stored"},
        "duplicates": {"type": "integer", "description": "already stored, or repeated"},
        "rejected": {
            "type": "array",
            "description": (
                "every invalid item with its 0-based index and reasons (at most 20 per"
                " item; past 1,000 reasons in a batch, the first reason only)"
            ),
            "items": {
                "type": "object",
                "required": ["index", "errors"],
                "properties": {
                    "index": {"type": "integer"},
                    "errors": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
                },
                "additionalProperties": {"type": ["string", "null"]},
            },
        },
    },
}


def _responses(id_field: str) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {
        202: {
            "description": "accepted (durable), duplicates and rejected items with reasons",
            "content": {
                "application/json": {
                    "schema": _REJECTED_SCHEMA,
                    "example": {
                        "accepted": 998,
                        "duplicates": 1,
                        "rejected": [
                            {"index": 7, id_field: "r-7", "errors": ["documents: must be >= 0"]}
                        ],
                    },
                }
            },
        },
        **error_responses(400, 401, 403, 413, 415, 503),
    }
    responses[400]["description"] = "the body is not JSON/NDJSON (or not gzip), or lacks the list"
    responses[413]["description"] = (
        "more than 10,000 items, or more than 16 MiB (decompressed, for a gzip body)"
    )
    responses[415]["description"] = "a Content-Encoding other than gzip or identity"
    responses[503]["description"] = (
        "items can be neither stored nor spooled, the service is starting, or too many"
        " request bodies are in flight; retry after Retry-After seconds"
    )
    responses[503]["headers"] = {
        "Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}
    }
    return responses


def _add_route(
    schema: StreamSchema[Any],
    pipeline_of: Callable[[IngestState], StreamPipeline[Any]],
    summary: str,
) -> None:
    """POST /v1/<stream>: one endpoint per stream, alike but for the schema. The function
    is named post_<stream> (FastAPI derives the route's name and operationId from it)."""

    async def endpoint(request: Request, services: IngestStateDep, _: Ingest) -> Response:
        return await _ingest(request, pipeline_of(services), schema, services)

    endpoint.__name__ = endpoint.__qualname__ = f"post_{schema.name}"
    router.post(
        f"/{schema.name}",
        status_code=202,
        openapi_extra=_request_body(schema),
        responses=_responses(schema.id_field),
        response_class=Response,
        summary=summary,
    )(endpoint)


def _events(services: IngestState) -> StreamPipeline[Event]:
    return services.events


def _probes(services: IngestState) -> StreamPipeline[Probe]:
    return services.probes


_add_route(EVENTS, _events, "Ingest gateway rerank events (JSON or NDJSON), exactly once")
_add_route(PROBES, _probes, "Ingest uptime probe results (JSON or NDJSON), exactly once")
