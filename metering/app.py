"""The FastAPI app factory.

The lifespan opens the services and starts them (migrations, spool replay, writers,
optional demo data, scheduler) in a background thread, so `/healthz` answers at once and
`/readyz` says 503 until the stores are migrated and answering.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering import __version__, metrics
from metering.auth.routes import router as api_keys_router
from metering.health.routes import router as health_router
from metering.ingest.routes import router as ingest_router
from metering.scheduler import Scheduler
from metering.services import Services
from metering.settings import Settings

log = logging.getLogger(__name__)

StartupHook = Callable[[Services], None]


class MetricsMiddleware:
    """Counts and times every request by route template (pure ASGI: no body copies)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope["method"]
            metrics.HTTP_REQUESTS.labels(template, method, str(status)).inc()
            metrics.HTTP_LATENCY.labels(template, method).observe(time.perf_counter() - started)


_NAMED = re.compile(r"^[A-Za-z_][\w.\[\]]*: ")


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "body"


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        field = _field(tuple(error.get("loc", ())))
        named = field == "body" and _NAMED.match(message) is not None
        errors.append(
            message if named or message.startswith(f"{field}:") else f"{field}: {message}"
        )
    return JSONResponse({"error": "invalid request", "errors": errors}, status_code=422)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


def create_app(
    settings: Settings,
    admin_token: str,
    *,
    startup_hooks: list[StartupHook] | None = None,
    run_scheduler: bool = True,
) -> FastAPI:
    """Build the app. `startup_hooks` run after the stores are ready (e.g. demo data)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.open(settings, admin_token)
        app.state.services = services
        scheduler = Scheduler(services)
        app.state.scheduler = scheduler

        def start() -> None:
            try:
                services.start()
                for hook in startup_hooks or []:
                    hook(services)
                if run_scheduler:
                    scheduler.start()
                services.ready = True
            except Exception as exc:
                services.startup_error = f"{type(exc).__name__}: {exc}"
                log.exception("startup failed")

        starter = threading.Thread(target=start, name="startup", daemon=True)
        starter.start()
        app.state.starter = starter
        try:
            yield
        finally:
            scheduler.shutdown()
            starter.join(timeout=60)
            services.close()

    app = FastAPI(
        title="Rerank metering",
        version=__version__,
        summary="Usage metering, billing and observability for an LLM rerank API gateway",
        lifespan=lifespan,
    )
    app.add_middleware(MetricsMiddleware)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    for router in (health_router, api_keys_router, ingest_router):
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    return app


def wait_ready(app: FastAPI, timeout: float = 120.0) -> Services:
    """Block until the app's services are ready (used by tests and the CLI)."""
    services: Services = app.state.services
    deadline = time.monotonic() + timeout
    while not services.ready:
        if services.startup_error:
            raise RuntimeError(services.startup_error)
        if time.monotonic() > deadline:
            raise TimeoutError("services did not become ready")
        time.sleep(0.01)
    return services
