"""Invoices: `POST /v1/invoices/run` (admin), `GET /v1/invoices`, `GET /v1/invoices/preview`,
`GET /v1/invoices/{id}` with `.html` and `.pdf` renderings.

A read key sees its own tenant's invoices only (another tenant's invoice is a 404); an
unknown tenant is a 404; a period that is not `YYYY-MM` a 400; a month that has not ended
a 409. A run first waits until every event accepted before it is stored (as reads do),
then runs in a worker thread in the request's transaction, committed when it returns.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol, cast

import stripe
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, Field, StrictBool
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from billing.invoices import render
from billing.invoices import repository as repo
from billing.invoices.periods import PATTERN, BadPeriod, Period
from billing.invoices.stripe_sync import mark_from_event
from metering.analytics.deps import AnalyticsStateDep, fresh
from metering.auth.deps import Admin, Reader
from metering.auth.service import Principal
from metering.db.deps import SessionDep
from metering.db.engine import session_scope
from metering.errors import ApiError, error_responses
from metering.invoices import service
from metering.settings import Settings
from metering.tenants.models import Tenant


class InvoiceIdConvertor(Convertor[str]):
    """Invoice ids in paths (`inv_` + 24 hex digits): `/v1/invoices/run` and `/preview`
    are then never read as an invoice id (nor advertised as GET-able in `Allow`)."""

    regex = "inv_[0-9a-f]{24}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("invoice_id", InvoiceIdConvertor())
router = APIRouter(prefix="/v1/invoices", tags=["invoices"])
stripe_router = APIRouter(prefix="/v1/stripe", tags=["invoices"])
WEBHOOK_TOLERANCE = 300  # seconds: an older signed timestamp is refused (replay)


class StripeState(Protocol):
    """What the webhook needs of the running service."""

    settings: Settings
    sessions: sessionmaker[Session]


async def stripe_state(request: Request) -> StripeState:
    return cast(StripeState, request.app.state.services)


StripeStateDep = Annotated[StripeState, Depends(stripe_state)]

TenantQ = Annotated[
    str | None,
    Query(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$", description="one tenant (admin)"),
]
# The pattern is documented; the check is parse_period's, with the contract's wording.
_PERIOD_SCHEMA = {"pattern": PATTERN}
PeriodQ = Annotated[
    str | None, Query(max_length=7, description="YYYY-MM", json_schema_extra=_PERIOD_SCHEMA)
]


class RunIn(BaseModel):
    period: Annotated[
        str,
        Field(
            max_length=16,
            description="YYYY-MM, a month that has ended",
            json_schema_extra=_PERIOD_SCHEMA,
        ),
    ]
    finalize: StrictBool = False


def parse_period(text: str) -> Period:
    try:
        return Period.parse(text)
    except BadPeriod as exc:
        raise ApiError(400, str(exc)) from None


def known_tenant(session: Session, tenant_id: str) -> None:
    if session.get(Tenant, tenant_id) is None:
        raise ApiError(404, f"tenant_id: no tenant {tenant_id}")


@router.post("/run", responses=error_responses(400, 401, 403, 409, 503))
async def run_invoices(
    body: RunIn, state: AnalyticsStateDep, session: SessionDep, _: Admin
) -> dict[str, Any]:
    """Build or refresh the month's drafts (`finalize` false), or finalize them (true).
    Running it again creates no duplicate; a finalized invoice never changes."""
    period = parse_period(body.period)
    now = datetime.now(UTC)
    if now < period.end:
        raise ApiError(409, f"period: {period} has not ended yet")
    await fresh(state)
    book = state.prices.get()
    stripe_on = bool(getattr(getattr(state, "settings", None), "stripe_api_key", None))

    def work() -> dict[str, Any]:
        with state.reads.client() as ch:
            result = service.run_period(
                session, ch, book, period, finalize=body.finalize, now=now, stripe=stripe_on
            )
        session.commit()
        return result.out()

    return await run_in_threadpool(work)


# The cursor is the (period, tenant) of the last invoice seen: "YYYY-MM/tenant".
_CURSOR = PATTERN[:-1] + "/[A-Za-z0-9_.:-]{1,64}$"


def _cursor(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    if re.match(_CURSOR, text) is None:
        raise ApiError(400, "cursor: not a cursor this endpoint returned")
    period, _, tenant = text.partition("/")
    return period, tenant


@router.get("", responses=error_responses(400, 401, 403, 404))
def list_invoices(
    session: SessionDep,
    principal: Reader,
    tenant_id: TenantQ = None,
    period: PeriodQ = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[
        str | None,
        Query(max_length=80, pattern=_CURSOR, description="`next_cursor` of the page before"),
    ] = None,
) -> dict[str, Any]:
    """Invoices, newest month first then by tenant; follow `next_cursor` for more."""
    tenant = principal.tenant_scope(tenant_id)
    if period is not None:
        parse_period(period)
    if tenant is not None:
        known_tenant(session, tenant)
    rows = repo.list_invoices(
        session, tenant_id=tenant, period=period, limit=limit, after=_cursor(cursor)
    )
    lines = repo.lines_of(session, [r.id for r in rows])
    details = repo.billing_of(session, {r.tenant_id for r in rows})
    out = [render.invoice_dict(r, lines[r.id], details.get(r.tenant_id)) for r in rows]
    next_cursor = None
    if len(rows) == limit:
        last = rows[-1]
        next_cursor = f"{last.period}/{last.tenant_id}"
    return {"invoices": out, "next_cursor": next_cursor}


@router.get("/preview", responses=error_responses(400, 401, 403, 404, 503))
async def preview_invoice(
    state: AnalyticsStateDep,
    session: SessionDep,
    principal: Reader,
    tenant_id: Annotated[
        str, Query(max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$", description="the tenant")
    ],
) -> dict[str, Any]:
    """The current month's invoice as it would stand if the month closed now (status
    `preview`), with `projected_total_usd` for the month's end."""
    tenant = principal.tenant_scope(tenant_id)
    assert tenant is not None
    known_tenant(session, tenant)
    await fresh(state)
    book = state.prices.get()
    now = datetime.now(UTC)

    def work() -> dict[str, Any]:
        with state.reads.client() as ch:
            p = service.preview(session, ch, book, tenant, now)
        details = repo.billing_of(session, [tenant]).get(tenant)
        out = render.built_dict(tenant, p.period, p.built, details)
        out["projected_total_usd"] = format(p.projected_total, "f")
        out["as_of"] = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return out

    return await run_in_threadpool(work)


def invoice_for(session: Session, principal: Principal, invoice_id: str) -> dict[str, Any]:
    """The invoice as rendered, if `principal` may see it (404 otherwise)."""
    row = repo.get_invoice(session, invoice_id)
    if row is None or (principal.tenant_id is not None and principal.tenant_id != row.tenant_id):
        raise ApiError(404, f"invoice_id: no invoice {invoice_id}")
    details = repo.billing_of(session, [row.tenant_id]).get(row.tenant_id)
    return render.invoice_dict(row, repo.lines_of(session, [row.id])[row.id], details)


_RENDERED = {
    **error_responses(401, 403, 404),
}


@router.get(
    "/{invoice_id:invoice_id}.html",
    responses={200: {"content": {"text/html": {}}}, **_RENDERED},
    response_class=Response,
)
def invoice_html(invoice_id: str, session: SessionDep, principal: Reader) -> Response:
    invoice = invoice_for(session, principal, invoice_id)
    return Response(render.html(invoice), media_type="text/html")


@router.get(
    "/{invoice_id:invoice_id}.pdf",
    responses={200: {"content": {"application/pdf": {}}}, **_RENDERED},
    response_class=Response,
)
def invoice_pdf(invoice_id: str, session: SessionDep, principal: Reader) -> Response:
    invoice = invoice_for(session, principal, invoice_id)
    name = f"invoice-{invoice['tenant_id']}-{invoice['period']}.pdf"
    return Response(
        render.pdf(invoice),
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{name}"'},
    )


@router.get("/{invoice_id:invoice_id}", responses=_RENDERED)
def get_invoice(invoice_id: str, session: SessionDep, principal: Reader) -> dict[str, Any]:
    return invoice_for(session, principal, invoice_id)


@stripe_router.post("/webhook", responses=error_responses(400))
async def stripe_webhook(
    request: Request,
    state: StripeStateDep,
    stripe_signature: Annotated[
        str | None,
        Header(alias="Stripe-Signature", description="t=<unix time>,v1=<HMAC-SHA256 hex>"),
    ] = None,
) -> dict[str, Any]:
    """Stripe's events, verified with `Stripe-Signature` (METERING_STRIPE_WEBHOOK_SECRET,
    at most 300 s old): `invoice.paid` marks our invoice paid, `invoice.voided` void.
    Other events, and events about invoices that are not ours, are acknowledged and
    ignored."""
    secret = state.settings.stripe_webhook_secret
    if not secret:
        raise ApiError(400, "stripe-signature: no webhook secret is configured")
    header = stripe_signature
    if not header:
        raise ApiError(400, "stripe-signature: missing header")
    payload = await request.body()
    try:
        event = stripe.Webhook.construct_event(
            payload.decode("utf-8", "replace"), header, secret, tolerance=WEBHOOK_TOLERANCE
        )
    except stripe.SignatureVerificationError:
        raise ApiError(
            400, f"stripe-signature: does not verify, or older than {WEBHOOK_TOLERANCE} s"
        ) from None
    except ValueError:
        raise ApiError(400, "body: not a Stripe event") from None
    now = datetime.now(UTC)

    def work() -> str | None:
        with session_scope(state.sessions) as session:
            return mark_from_event(session, event, now)

    invoice_id = await run_in_threadpool(work)
    return {"received": True, "type": event["type"], "invoice_id": invoice_id}
