"""Invoice tables.

- `invoices`: one row per (tenant, period); `status` draft -> finalized -> paid | void.
  A finalized row and its lines are never written again except for the Stripe ids and
  the paid/void status. `number` is handed out at finalization from `invoice_counters`
  in the same transaction, so numbers are sequential with no gaps (a rolled back
  finalization rolls its numbers back too). The billing details shown are copied onto
  the invoice when it is finalized: a later change of the tenant's details does not
  rewrite an issued invoice.
- `invoice_lines`: one row per (project, provider, model, meter, price entry) and usage
  period; late lines (usage of an earlier, closed month) carry their own `usage_period`.
  Quantities are exact integers, money is exact decimal text. No foreign key (see the
  column's comment): lines are written and deleted only with their invoice.
- `invoice_periods`: one row per month that was run: whether it is closed (finalized)
  and when its closing run started reading usage (events stored after that instant are
  the candidates for late lines).
- `invoice_counters`: the numbering counter; its row is also the lock that serializes
  invoice runs (API, CLI, scheduler, several replicas).
- `tenant_billing`: the billing details an invoice shows (`PUT /v1/tenants/{id}`) and
  the tenant's Stripe customer id.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from billing.db import Base, DecimalText, UTCDateTime, utcnow


class InvoiceRow(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("tenant_id", "period"),
        UniqueConstraint("number"),
        Index("ix_invoices_period_status", "period", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    period: Mapped[str] = mapped_column(String(7))  # YYYY-MM
    status: Mapped[str] = mapped_column(String(16), default="draft")
    number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    subtotal_usd: Mapped[Decimal] = mapped_column(DecimalText)
    total_usd: Mapped[Decimal] = mapped_column(DecimalText)
    # Why a draft was not finalized (e.g. unpriced usage); null otherwise.
    held_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Billing details as they were at finalization (null on drafts: they show today's).
    bill_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    bill_email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    bill_address: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    voided_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # pending (to send), sent (finalized in Stripe), null (no Stripe configured or draft)
    stripe_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    stripe_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class InvoiceLineRow(Base):
    __tablename__ = "invoice_lines"

    # No foreign key to invoices: PostgreSQL checks one per row, which tripled the time to
    # store a month's millions of lines (bench/RESULTS.md). Lines are only written and
    # deleted with their invoice, in the same transaction (billing.invoices.repository).
    invoice_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    meter: Mapped[str] = mapped_column(String(16))
    price_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # null: unpriced
    quantity: Mapped[int] = mapped_column(BigInteger)
    unit: Mapped[str] = mapped_column(String(16))
    unit_price_usd: Mapped[Decimal | None] = mapped_column(DecimalText, nullable=True)
    amount_usd: Mapped[Decimal] = mapped_column(DecimalText)
    usage_period: Mapped[str] = mapped_column(String(7))
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    stripe_item_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class InvoicePeriodRow(Base):
    __tablename__ = "invoice_periods"

    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # draft | finalized
    drafted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Wall-clock instant the closing run started reading usage.
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class InvoiceCounterRow(Base):
    __tablename__ = "invoice_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_number: Mapped[int] = mapped_column(Integer, default=0)


class TenantBillingRow(Base):
    __tablename__ = "tenant_billing"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    address: Mapped[str | None] = mapped_column(Text, nullable=True)
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    stripe_customer_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
