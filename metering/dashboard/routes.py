"""`GET /dashboard`: the developer usage dashboard, served by the service itself.

Server-rendered HTML and SVG, no script at all, every asset from `/dashboard/static`, and a
Content-Security-Policy that allows nothing else: the page works with no network. The page
is streamed: the header and the four cards go out as soon as their figures are read (the
first paint), the other sections follow as their queries finish (all run at once).
The cards' `data-value`s are the exact figures of `/v1/stats` for the same window
(`data-from`/`data-to` on their section).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from billing.invoices import render as invoice_render
from metering.analytics import requests as log
from metering.analytics.deps import AnalyticsState, fresh
from metering.auth.service import Principal, TenantForbidden, resolve
from metering.budgets.runtime import BudgetRuntime
from metering.dashboard import session
from metering.dashboard.data import WINDOWS, start_all, window_of
from metering.dashboard.sections import SECTIONS, page
from metering.errors import ApiError
from metering.invoices.routes import invoice_for

router = APIRouter(include_in_schema=False)
HERE = Path(__file__).parent
STATIC = {p.name: p for p in (HERE / "static").iterdir() if p.is_file()}
_TYPES = {".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'"
)
MAX_FORM_BYTES = 4096


class DashboardState(AnalyticsState, Protocol):
    admin_token: str
    sessions: sessionmaker[Session]
    budgets: BudgetRuntime


def _state(request: Request) -> DashboardState:
    return cast(DashboardState, request.app.state.services)


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        body, status, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"}
    )


def _principal(request: Request) -> Principal | None:
    state = _state(request)
    with state.sessions() as db:
        return session.principal_of(db, state.admin_token, request.cookies.get(session.COOKIE))


@router.get("/dashboard/static/{name}")
def static(name: str) -> Response:
    path = STATIC.get(name)
    if path is None:
        raise ApiError(404, f"path: no asset {name}")
    return Response(
        path.read_bytes(),
        media_type=_TYPES.get(path.suffix, "application/octet-stream"),
        headers={"Cache-Control": "public, max-age=3600"},
    )


@router.post("/dashboard/session")
async def sign_in(request: Request) -> Response:
    body = await request.body()
    token = ""
    if len(body) <= MAX_FORM_BYTES:
        values = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        token = (values.get("token") or [""])[0].strip()
    state = _state(request)

    def lookup() -> Principal | None:
        with state.sessions() as db:
            return resolve(db, state.admin_token, token) if token else None

    principal = await run_in_threadpool(lookup)
    if principal is None or not principal.has("read"):
        reason = "That token is not valid." if principal is None else "That key cannot read usage."
        # The form again (200: a browser logs no failed load for it), and no cookie.
        return _html(page.signin(reason))
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(
        session.COOKIE,
        session.issue(state.admin_token, principal),
        max_age=session.LIFETIME,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.get("/dashboard/invoices/{invoice_id}.{kind}")
def invoice_file(invoice_id: str, kind: str, request: Request) -> Response:
    """An invoice as HTML or PDF for the signed-in session (the API's `.html`/`.pdf` take
    a bearer token, which a browser session does not send)."""
    principal = _principal(request)
    if principal is None:
        return RedirectResponse("/dashboard", status_code=303)
    if kind not in ("html", "pdf"):
        raise ApiError(404, f"path: no invoice format {kind}")
    with _state(request).sessions() as db:
        invoice = invoice_for(db, principal, invoice_id)
    if kind == "html":
        return HTMLResponse(invoice_render.html(invoice))
    name = f"invoice-{invoice['tenant_id']}-{invoice['period']}.pdf"
    return Response(
        invoice_render.pdf(invoice),
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{name}"'},
    )


@router.post("/dashboard/logout")
def sign_out() -> Response:
    response = RedirectResponse("/dashboard", status_code=303)
    response.delete_cookie(session.COOKIE, path="/")
    return response


@router.get("/dashboard")
async def dashboard(request: Request) -> Response:
    principal = await run_in_threadpool(_principal, request)
    if principal is None:
        return _html(page.signin(None))
    state = _state(request)
    params = request.query_params
    window_name = params.get("window", "30d")
    if window_name not in WINDOWS:
        window_name = "30d"
    try:
        tenant = principal.tenant_scope(_word(params.get("tenant_id"), 64))
    except TenantForbidden:
        tenant = principal.tenant_id
    window = window_of(window_name)
    status = params.get("status") or None
    if status not in (None, "ok", "error"):
        status = None
    filters = log.Filters(
        tenant,
        _word(params.get("project_id")),
        _word(params.get("provider")),
        _word(params.get("model")),
        status,
    )
    digest = filters.digest(["dashboard", window_name])
    cursor = None
    if params.get("cursor"):
        try:
            cursor = log.Cursor.decode(params["cursor"], digest)
        except ApiError:
            cursor = None
    await fresh(state)
    book = state.prices.get()
    tasks = start_all(state, book, window, tenant, filters, cursor, digest)

    def query(**changes: Any) -> str:
        current = {k: v for k, v in params.items() if v}
        current.update({k: v for k, v in changes.items()})
        return urlencode({k: v for k, v in current.items() if v is not None})

    who = "Admin · all tenants" if principal.is_admin and tenant is None else f"Tenant {tenant}"
    if principal.is_admin and tenant is not None:
        who = f"Admin · tenant {tenant}"

    async def stream() -> AsyncIterator[str]:
        try:
            yield str(page.top(who, tenant, window_name, list(WINDOWS), principal.is_admin, query))
            for section in SECTIONS:
                try:
                    yield await section(state, tasks, tenant, window_name, query, principal)
                except Exception as exc:  # one section failing does not blank the page
                    yield str(page.failed(section.__name__.strip("_"), f"{type(exc).__name__}"))
            yield "</main><footer><p>Figures are exact; money in USD.</p></footer></body></html>"
        finally:
            for task in tasks.values():
                task.cancel()

    return StreamingResponse(
        stream(),
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
    )


def _word(value: str | None, limit: int = 128) -> str | None:
    """A filter from the query string: absent when empty, cut to `limit` characters."""
    if not value:
        return None
    return value[:limit]
