"""Finalized invoices to Stripe, with the official SDK: a customer per tenant, the
invoice (draft, our lines only), one invoice item per line, then finalize.

Exactly once, whatever fails:
- every request carries an idempotency key derived from our ids (`invoice-<id>`,
  `item-<id>-<position>`, `finalize-<id>`, `customer-<tenant>-<hash of its params>`), so
  a retry after a timeout or a 500, even one Stripe applied, returns the first answer
  instead of creating a second object;
- every Stripe id is stored (and committed) as soon as it is known, so a sync that dies
  half-way resumes where it stopped, and what it re-sends carries the same keys;
- failed requests are retried with backoff (connection errors and timeouts, 409, 429,
  5xx); an idempotency error (the same key with other parameters) is not retried: it is
  stored on the invoice (`stripe_error`) for an operator.

Amounts: a line's amount is already rounded to the cent, so Stripe gets it in cents.
When its quantity times the unit price is a whole number of cents, the item is sent as
`quantity` x `unit_amount_decimal` (cents per token or pair, up to 12 decimals), so
Stripe shows the usage itself; otherwise as `amount`. Lines of $0 are not sent. After
finalizing, Stripe's total must equal ours, or the invoice gets a `stripe_error`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import stripe
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from billing.invoices.models import InvoiceLineRow, InvoiceRow, TenantBillingRow
from billing.rating import UNIT_EXPONENT, Meter

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_DECIMALS = 12  # Stripe's limit for unit_amount_decimal


class StripeSyncError(RuntimeError):
    """Stripe refused a request that retrying cannot fix."""


class StripeGateway:
    """The SDK client and the retry policy."""

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout: float = 20.0,
        attempts: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=0,  # retried here, with our keys and backoff
            http_client=stripe.RequestsClient(timeout=timeout),
        )
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep = sleep

    def call(self, fn: Callable[..., T], *args: Any, params: dict[str, Any], key: str) -> T:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, params=params, options={"idempotency_key": key})
            except stripe.IdempotencyError as exc:
                raise StripeSyncError(f"stripe: idempotency key {key}: {exc}") from exc
            except stripe.StripeError as exc:
                status = exc.http_status
                retry = (
                    isinstance(exc, stripe.APIConnectionError)
                    or status in (409, 429)
                    or (status is not None and status >= 500)
                )
                if not retry:
                    raise StripeSyncError(f"stripe: {key}: {exc}") from exc
                if attempt == self.attempts:
                    raise
                log.info("stripe %s failed (%s), retry %d in %.2f s", key, exc, attempt, delay)
                self.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")


def _cents(amount: Decimal) -> int:
    cents = amount * 100
    if cents != cents.to_integral_value():
        raise StripeSyncError(f"amount {amount} is not a whole number of cents")
    return int(cents)


def item_params(line: InvoiceLineRow, customer: str, invoice: str) -> dict[str, Any]:
    assert line.unit_price_usd is not None
    meter: Meter = line.meter  # type: ignore[assignment]
    per_unit = (line.unit_price_usd * 100).scaleb(-UNIT_EXPONENT[meter]).normalize()
    params: dict[str, Any] = {
        "customer": customer,
        "invoice": invoice,
        "currency": "usd",
        "description": (
            f"{line.usage_period} {line.project_id} {line.provider}/{line.model} {line.meter}:"
            f" {line.quantity} at {format(line.unit_price_usd, 'f')} USD per {line.unit}"
        ),
        "metadata": {"line": str(line.position), "usage_period": line.usage_period},
    }
    exponent = per_unit.as_tuple().exponent
    decimals = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    product = per_unit * line.quantity
    if decimals <= MAX_DECIMALS and product == product.to_integral_value():
        assert int(product) == _cents(line.amount_usd)
        params["quantity"] = line.quantity
        params["unit_amount_decimal"] = format(per_unit, "f")
    else:
        params["amount"] = _cents(line.amount_usd)
    return params


def _customer(session: Session, gw: StripeGateway, inv: InvoiceRow) -> str:
    billing = session.get(TenantBillingRow, inv.tenant_id)
    if billing is None:
        billing = TenantBillingRow(tenant_id=inv.tenant_id, currency="USD")
        session.add(billing)
    if billing.stripe_customer_id:
        return billing.stripe_customer_id
    params: dict[str, Any] = {
        "name": billing.name or inv.tenant_id,
        "metadata": {"tenant_id": inv.tenant_id},
    }
    if billing.email:
        params["email"] = billing.email
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    customer = gw.call(
        gw.client.v1.customers.create, params=params, key=f"customer-{inv.tenant_id}-{digest}"
    )
    billing.stripe_customer_id = customer.id
    session.commit()
    return customer.id


def sync_invoice(session: Session, gw: StripeGateway, invoice_id: str) -> bool:
    """Send one finalized invoice; True once it is finalized in Stripe. Commits as it goes."""
    inv = session.get(InvoiceRow, invoice_id)
    if inv is None or inv.stripe_status != "pending":
        return False
    customer = _customer(session, gw, inv)
    if not inv.stripe_invoice_id:
        created = gw.call(
            gw.client.v1.invoices.create,
            params={
                "customer": customer,
                "currency": "usd",
                "collection_method": "send_invoice",
                "days_until_due": 30,
                "auto_advance": False,
                "pending_invoice_items_behavior": "exclude",
                "description": f"Rerank usage {inv.period} (invoice {inv.number:06d})"
                if inv.number
                else f"Rerank usage {inv.period}",
                "metadata": {"invoice_id": inv.id, "number": str(inv.number), "period": inv.period},
            },
            key=f"invoice-{inv.id}",
        )
        inv.stripe_invoice_id = created.id
        session.commit()
    stripe_invoice = inv.stripe_invoice_id
    lines = session.scalars(
        select(InvoiceLineRow)
        .where(InvoiceLineRow.invoice_id == inv.id)
        .order_by(InvoiceLineRow.position)
    )
    for line in lines:
        if line.stripe_item_id or line.amount_usd == 0:
            continue
        item = gw.call(
            gw.client.v1.invoice_items.create,
            params=item_params(line, customer, stripe_invoice),
            key=f"item-{inv.id}-{line.position}",
        )
        line.stripe_item_id = item.id
        session.commit()
    final = gw.call(
        gw.client.v1.invoices.finalize_invoice,
        stripe_invoice,
        params={"auto_advance": True},
        key=f"finalize-{inv.id}",
    )
    want = _cents(inv.total_usd)
    if final.total != want:
        inv.stripe_error = f"stripe total {final.total} cents, ours {want}"
        inv.stripe_status = "failed"
    else:
        inv.stripe_status = "sent"
        inv.stripe_error = None
    session.commit()
    return inv.stripe_status == "sent"


def pending_ids(session: Session, limit: int = 1000) -> list[str]:
    query = (
        select(InvoiceRow.id)
        .where(InvoiceRow.stripe_status == "pending")
        .order_by(InvoiceRow.number)
        .limit(limit)
    )
    return list(session.scalars(query))


def sync_pending(sessions: sessionmaker[Session], gw: StripeGateway) -> dict[str, int]:
    """Send every finalized invoice not yet in Stripe; one failing invoice does not stop
    the others (its error is stored; it is tried again next time)."""
    done = {"sent": 0, "failed": 0}
    with sessions() as session:
        ids = pending_ids(session)
    for invoice_id in ids:
        with sessions() as session:
            try:
                if sync_invoice(session, gw, invoice_id):
                    done["sent"] += 1
            except (StripeSyncError, stripe.StripeError) as exc:
                session.rollback()
                row = session.get(InvoiceRow, invoice_id)
                if row is not None:
                    row.stripe_error = str(exc)[:2000]
                    session.commit()
                done["failed"] += 1
                log.warning("stripe sync of %s failed: %s", invoice_id, exc)
    return done


def mark_from_event(session: Session, event: Any, at: Any) -> str | None:
    """Apply a verified webhook event: `invoice.paid` -> paid, `invoice.voided` -> void.
    Returns our invoice id, or None when the event is not about one of ours."""
    status = {"invoice.paid": "paid", "invoice.voided": "void"}.get(event["type"])
    if status is None:
        return None
    obj = event["data"]["object"]
    row = session.scalar(select(InvoiceRow).where(InvoiceRow.stripe_invoice_id == obj["id"]))
    if row is None:
        ours = (obj.get("metadata") or {}).get("invoice_id")
        row = session.get(InvoiceRow, ours) if ours else None
    if row is None or row.status == "draft":
        return None
    if row.status != status:
        row.status = status
        if status == "paid":
            row.paid_at = at
        else:
            row.voided_at = at
        row.updated_at = at
    return row.id
