"""The FastAPI app factory.

The lifespan opens the services and starts them (migrations, spool replay, writers,
optional demo data, scheduler) in a background thread, so `/healthz` answers at once and
`/readyz` says 503 until the stores are migrated and answering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from clickhouse_connect.driver.exceptions import OperationalError
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError as SAOperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering import __version__, metrics
from metering.analytics.deps import AnalyticsState
from metering.analytics.log_routes import router as log_router
from metering.analytics.routes import router as figures_router
from metering.auth.deps import AuthState
from metering.auth.routes import router as api_keys_router
from metering.auth.service import TenantForbidden
from metering.budgets.authorize import AuthorizeFastPath
from metering.budgets.routes import BudgetState, authorize_router
from metering.budgets.routes import router as budgets_router
from metering.dashboard.routes import DashboardState
from metering.dashboard.routes import router as dashboard_router
from metering.db.deps import SessionState
from metering.errors import (
    ApiError,
    allowed_methods,
    conform_openapi,
    error_response,
    http_error_messages,
    too_large,
    validation_messages,
)
from metering.health.routes import HealthState
from metering.health.routes import router as health_router
from metering.http.protocol import CLIENT_GONE, CLOSED_STATUS, MAX_JSON_BODY
from metering.ingest.routes import IngestState
from metering.ingest.routes import router as ingest_router
from metering.ingest.spool import Unavailable
from metering.invoices.routes import router as invoices_router
from metering.invoices.routes import stripe_router
from metering.prices.routes import router as prices_router
from metering.scheduler import Scheduler
from metering.services import Services
from metering.settings import Settings
from metering.tenants.routes import router as tenants_router

log = logging.getLogger(__name__)

StartupHook = Callable[[Services], None]


def _route_state(services: Services) -> Services:
    """The object the routes read from `app.state.services`. Each route module names what
    it needs as a Protocol instead of importing this composition root; these assignments
    make mypy check that `Services` provides all of them."""
    auth: AuthState = services
    session: SessionState = services
    health: HealthState = services
    ingest: IngestState = services
    analytics: AnalyticsState = services
    budgets: BudgetState = services
    dashboard: DashboardState = services
    del auth, session, health, ingest, analytics, budgets, dashboard
    return services


class MetricsMiddleware:
    """Counts and times every request by route template (pure ASGI: no body copies).

    A request whose connection closed before its answer was complete is counted under the
    status the server's protocol put in its scope (metering.http.protocol: 499 when the
    client went away, 408 when its body timed out), not under what the app tried to send.
    A ClientDisconnect the app lets through is the client's doing as well: counted 499 and
    not raised further, so no traceback is logged for it.
    """

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
        except ClientDisconnect:
            status = CLIENT_GONE
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope["method"]
            label = str(scope.get(CLOSED_STATUS, status))
            metrics.HTTP_REQUESTS.labels(template, method, label).inc()
            metrics.HTTP_LATENCY.labels(template, method).observe(time.perf_counter() - started)


_STREAMED = ("/v1/events", "/v1/probes")


class BodyLimitMiddleware:
    """Bounds the request bodies of every endpoint that reads its body whole (budgets,
    prices, keys, authorize, invoices, the dashboard's sign-in form): more than
    MAX_JSON_BODY bytes is a 413 in the error shape, answered without reading the rest.
    The ingest endpoints stream and bound their own bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_STREAMED):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > MAX_JSON_BODY:
                await self._too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_JSON_BODY:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
        await too_large(MAX_JSON_BODY)(scope, receive, send)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, validation_messages(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path 404, method 405) and any HTTPException."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = allowed_methods(request.app.router.routes, request.scope)
        headers["Allow"] = ", ".join(allowed)
    messages = http_error_messages(exc.status_code, exc.detail, request.method, request.url.path)
    return error_response(exc.status_code, messages, headers)


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.errors, exc.headers)


async def _tenant_forbidden(_: Request, exc: Exception) -> Response:
    return error_response(403, f"tenant_id: {exc}")


async def _unavailable(_: Request, exc: Exception) -> Response:
    """A store not connected yet, or one that refused the connection: retry later."""
    if isinstance(exc, Unavailable):
        reason = str(exc)
    elif isinstance(exc, DBAPIError):
        reason = "database: unreachable; retry"
    else:
        reason = "clickhouse: unreachable; retry"
    return error_response(503, reason, {"Retry-After": "1"})


async def _server_error(_: Request, exc: Exception) -> Response:
    """500 in the error shape, without details (Starlette logs the traceback)."""
    return error_response(500, "server: internal error")


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
        app.state.services = _route_state(services)
        scheduler = Scheduler(services)
        app.state.scheduler = scheduler

        def start() -> None:
            try:
                # Retried with backoff while a store is unreachable (/readyz says why).
                if not services.keep_starting():
                    return  # shutting down before the stores answered
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
            services.stop_starting()
            starter.join(timeout=60)
            services.close()

    app = FastAPI(
        title="Rerank metering",
        version=__version__,
        summary="Usage metering, billing and observability for an LLM rerank API gateway",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(AuthorizeFastPath)  # outermost: the gateway's per-request check
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(TenantForbidden, _tenant_forbidden)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_exception_handler(OperationalError, _unavailable)
    app.add_exception_handler(SAOperationalError, _unavailable)
    app.add_exception_handler(Exception, _server_error)
    for router in (
        authorize_router,
        health_router,
        api_keys_router,
        ingest_router,
        prices_router,
        figures_router,
        log_router,
        budgets_router,
        dashboard_router,
        invoices_router,
        stripe_router,
        tenants_router,
    ):
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        return conform_openapi(fastapi_openapi())

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def wait_ready(app: FastAPI, timeout: float = 120.0) -> Services:
    """Block until the app's services are ready (used by tests and the CLI)."""
    services: Services = app.state.services
    deadline = time.monotonic() + timeout
    while not services.ready:
        if services.startup_error:
            raise RuntimeError(services.startup_error)
        if time.monotonic() > deadline:
            waiting = f": {services.waiting_for}" if services.waiting_for else ""
            raise TimeoutError(f"services did not become ready{waiting}")
        time.sleep(0.01)
    return services
