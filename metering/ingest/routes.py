"""POST /v1/events and POST /v1/probes: the gateway's ingest endpoints.

The body is read raw and decoded by msgspec (see metering.ingest.decode); FastAPI's
own body parsing is skipped on this path because it is ~3x slower. A 202 is sent only
after the accepted items are in the spool (and fsync'd when METERING_SPOOL_FSYNC is
"always"), so it means the items are durable.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import APIRouter, Request, Response

from metering.deps import Ingest, ServicesDep
from metering.ingest.decode import (
    EVENTS,
    PROBES,
    BodyError,
    StreamSchema,
    TooLarge,
    decode_batch,
)
from metering.ingest.pipeline import StreamPipeline, SubmitResult
from metering.ingest.spool import SpoolFull, Unavailable
from metering.ingest.structs import MAX_BATCH_EVENTS, MAX_BODY_BYTES, Event, Probe

router = APIRouter(prefix="/v1", tags=["ingest"])

_encoder = msgspec.json.Encoder()
RETRY_AFTER_SECONDS = "5"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        _encoder.encode({"error": message}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def _read_body(request: Request) -> bytes | Response:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _error(413, f"body: must be at most {MAX_BODY_BYTES} bytes (16 MiB)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return _error(413, f"body: must be at most {MAX_BODY_BYTES} bytes (16 MiB)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _ingest(
    request: Request, pipeline: StreamPipeline[Any], schema: StreamSchema[Any], ready: bool
) -> Response:
    body = await _read_body(request)
    if isinstance(body, Response):
        return body
    ndjson = request.headers.get("content-type", "").split(";")[0].strip() in (
        "application/x-ndjson",
        "application/jsonl",
        "application/jsonlines",
    )
    try:
        decoded = decode_batch(schema, body, ndjson=ndjson)
    except TooLarge as exc:
        return _error(413, str(exc))
    except BodyError as exc:
        return _error(400, str(exc))
    if not ready:
        return _error(
            503,
            "starting: the service is applying migrations",
            {"Retry-After": RETRY_AFTER_SECONDS},
        )
    try:
        result: SubmitResult = pipeline.submit(decoded)
        await pipeline.durable(result)
    except SpoolFull as exc:
        return _error(503, f"cannot store events now: {exc}", {"Retry-After": RETRY_AFTER_SECONDS})
    except Unavailable as exc:
        return _error(503, str(exc), {"Retry-After": RETRY_AFTER_SECONDS})
    except OSError as exc:
        return _error(503, f"cannot spool events: {exc}", {"Retry-After": RETRY_AFTER_SECONDS})
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


_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "accepted (durable), duplicates and rejected items with reasons",
        "content": {
            "application/json": {
                "example": {
                    "accepted": 998,
                    "duplicates": 1,
                    "rejected": [
                        {"index": 7, "event_id": "r-7", "errors": ["documents: must be >= 0"]}
                    ],
                }
            }
        },
    },
    400: {"description": "the body is not JSON/NDJSON or lacks the list"},
    401: {"description": "missing or unknown token"},
    403: {"description": "the key lacks the ingest scope"},
    413: {"description": "more than 10,000 items or 16 MiB"},
    503: {"description": "items can be neither stored nor spooled; retry after Retry-After"},
}


@router.post(
    "/events",
    status_code=202,
    openapi_extra=_request_body(EVENTS),
    responses=_RESPONSES,
    response_class=Response,
    summary="Ingest gateway rerank events (JSON or NDJSON), exactly once",
)
async def post_events(request: Request, services: ServicesDep, _: Ingest) -> Response:
    pipeline: StreamPipeline[Event] = services.events
    return await _ingest(request, pipeline, EVENTS, services.ready)


@router.post(
    "/probes",
    status_code=202,
    openapi_extra=_request_body(PROBES),
    responses=_RESPONSES,
    response_class=Response,
    summary="Ingest uptime probe results (JSON or NDJSON), exactly once",
)
async def post_probes(request: Request, services: ServicesDep, _: Ingest) -> Response:
    pipeline: StreamPipeline[Probe] = services.probes
    return await _ingest(request, pipeline, PROBES, services.ready)
