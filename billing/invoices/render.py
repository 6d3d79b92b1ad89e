"""An invoice as the API writes it (a plain dict), as HTML and as PDF.

HTML and PDF come from one Jinja2 template (`templates/invoice.html`): the HTML view is
the template's output; the PDF is the same output laid out by fpdf2's HTML renderer, with
a core font, so its text can be extracted (tests read it back with pypdf). Core fonts
cover Latin-1: other characters are written as `?` in the PDF (the HTML keeps them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from fpdf import FPDF
from jinja2 import Environment, FileSystemLoader, select_autoescape

from billing.invoices.builder import Built
from billing.invoices.models import InvoiceLineRow, InvoiceRow, TenantBillingRow
from billing.rating import money

_TEMPLATES = Path(__file__).parent / "templates"
_env = Environment(
    loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(["html"]), auto_reload=False
)


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _cents(value: Decimal) -> str:
    return format(value, "f")


def line_dict(
    *,
    project_id: str,
    provider: str,
    model: str,
    meter: str,
    quantity: int,
    unit: str,
    unit_price: Decimal | None,
    amount: Decimal,
    usage_period: str,
    late: bool,
    price_id: str | None,
) -> dict[str, Any]:
    return {
        "project_id": project_id,
        "provider": provider,
        "model": model,
        "meter": meter,
        "quantity": quantity,
        "unit": unit,
        "unit_price_usd": None if unit_price is None else money(unit_price),
        "amount_usd": _cents(amount),
        "usage_period": usage_period,
        "late": late,
        "unpriced": unit_price is None,
        "price_id": price_id,
    }


def billing_dict(
    invoice: InvoiceRow | None, details: TenantBillingRow | None
) -> dict[str, str | None]:
    """The details shown: those copied at finalization, else the tenant's current ones."""
    if invoice is not None and invoice.status != "draft":
        return {
            "name": invoice.bill_name,
            "email": invoice.bill_email,
            "address": invoice.bill_address,
        }
    if details is None:
        return {"name": None, "email": None, "address": None}
    return {"name": details.name, "email": details.email, "address": details.address}


def invoice_dict(
    invoice: InvoiceRow, lines: Sequence[InvoiceLineRow], details: TenantBillingRow | None
) -> dict[str, Any]:
    return {
        "id": invoice.id,
        "number": invoice.number,
        "tenant_id": invoice.tenant_id,
        "period": invoice.period,
        "status": invoice.status,
        "currency": invoice.currency,
        "billing": billing_dict(invoice, details),
        "lines": [
            line_dict(
                project_id=ln.project_id,
                provider=ln.provider,
                model=ln.model,
                meter=ln.meter,
                quantity=ln.quantity,
                unit=ln.unit,
                unit_price=ln.unit_price_usd,
                amount=ln.amount_usd,
                usage_period=ln.usage_period,
                late=ln.late,
                price_id=ln.price_id,
            )
            for ln in lines
        ],
        "subtotal_usd": _cents(invoice.subtotal_usd),
        "total_usd": _cents(invoice.total_usd),
        "held_reason": invoice.held_reason,
        "created_at": _iso(invoice.created_at),
        "finalized_at": _iso(invoice.finalized_at),
        "paid_at": _iso(invoice.paid_at),
        "voided_at": _iso(invoice.voided_at),
        "stripe_invoice_id": invoice.stripe_invoice_id,
    }


def built_dict(
    tenant_id: str, period: str, built: Built, details: TenantBillingRow | None
) -> dict[str, Any]:
    """A built invoice that is not stored (the preview)."""
    return {
        "id": None,
        "number": None,
        "tenant_id": tenant_id,
        "period": period,
        "status": "preview",
        "currency": details.currency if details else "USD",
        "billing": billing_dict(None, details),
        "lines": [
            line_dict(
                project_id=ln.key.project_id,
                provider=ln.key.provider,
                model=ln.key.model,
                meter=ln.key.meter,
                quantity=ln.quantity,
                unit=ln.unit,
                unit_price=ln.unit_price,
                amount=ln.amount,
                usage_period=ln.usage_period,
                late=ln.late,
                price_id=ln.key.price_id,
            )
            for ln in built.lines
        ],
        "subtotal_usd": _cents(built.subtotal),
        "total_usd": _cents(built.total),
        "held_reason": built.unpriced_reason(),
    }


def html(invoice: dict[str, Any], *, for_pdf: bool = False) -> str:
    return _env.get_template("invoice.html").render(inv=invoice, for_pdf=for_pdf)


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def pdf(invoice: dict[str, Any]) -> bytes:
    doc = FPDF(orientation="landscape", format="A4")
    doc.set_title(_latin1(f"Invoice {invoice.get('number') or invoice['id']}"))
    doc.set_creator("rerank-metering")
    doc.add_page()
    doc.set_font("Helvetica", size=9)
    doc.write_html(_latin1(html(invoice, for_pdf=True)))
    return bytes(doc.output())
