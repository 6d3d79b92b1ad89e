"""Liveness, readiness and Prometheus metrics. None needs a token."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from metering import metrics
from metering.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 while the process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="200 once migrations are applied and both stores answer, 503 before",
    responses={503: {"description": "not ready; the body says why"}},
)
def readyz(services: ServicesDep) -> JSONResponse:
    if not services.ready:
        reason = services.startup_error or "starting: applying migrations and replaying spool"
        return JSONResponse({"status": "starting", "reason": reason}, status_code=503)
    problems = services.check()
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus text exposition", response_class=Response)
def prometheus_metrics(services: ServicesDep) -> Response:
    if services.ready:
        metrics.SPOOL_BYTES.labels("events").set(services.events.spool.pending_bytes)
        metrics.SPOOL_BYTES.labels("probes").set(services.probes.spool.pending_bytes)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
