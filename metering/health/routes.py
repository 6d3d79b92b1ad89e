"""Liveness, readiness and Prometheus metrics. None needs a token."""

from __future__ import annotations

from typing import Annotated, Protocol, cast

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from metering import metrics
from metering.ingest.spool import Spool

router = APIRouter(tags=["health"])


class _Stream(Protocol):
    @property
    def spool(self) -> Spool: ...


class HealthState(Protocol):
    """What the health routes need of the running service."""

    ready: bool
    startup_error: str | None

    @property
    def waiting_for(self) -> str | None: ...

    @property
    def events(self) -> _Stream: ...

    @property
    def probes(self) -> _Stream: ...

    def check(self) -> dict[str, str]: ...


def _state(request: Request) -> HealthState:
    return cast(HealthState, request.app.state.services)


ServicesDep = Annotated[HealthState, Depends(_state)]


@router.get("/healthz", summary="200 while the process is up")
async def healthz() -> dict[str, str]:
    # async: answered on the event loop, no hop to a worker thread (it must stay fast
    # while the loop is busy with ingest)
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="200 once migrations are applied and both stores answer, 503 before",
    responses={503: {"description": "not ready; the body says why"}},
)
def readyz(services: ServicesDep) -> JSONResponse:
    if not services.ready:
        reason = (
            services.startup_error
            or services.waiting_for  # a store unreachable: "clickhouse: ..." (retrying)
            or "starting: applying migrations and replaying spool"
        )
        return JSONResponse({"status": "starting", "reason": reason}, status_code=503)
    problems = services.check()
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready"})


# HEAD answers like GET (the server sends no body); left out of the schema, where
# HEAD is implied by GET.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus text exposition", response_class=Response)
def prometheus_metrics(services: ServicesDep) -> Response:
    if services.ready:
        metrics.SPOOL_BYTES.labels("events").set(services.events.spool.pending_bytes)
        metrics.SPOOL_BYTES.labels("probes").set(services.probes.spool.pending_bytes)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
