"""Invoices, their lines, the months run, the numbering counter (seeded with its one row)
and tenants' billing details (frozen: never edit; billing/invoices/models.py says what
each table is for).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    counters = op.create_table(
        "invoice_counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("last_number", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_invoice_counters")),
    )
    op.bulk_insert(counters, [{"name": "invoices", "last_number": 0}])
    op.create_table(
        "invoice_periods",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("drafted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_invoice_periods")),
    )
    op.create_table(
        "invoices",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("subtotal_usd", sa.String(length=64), nullable=False),
        sa.Column("total_usd", sa.String(length=64), nullable=False),
        sa.Column("held_reason", sa.Text(), nullable=True),
        sa.Column("bill_name", sa.String(length=200), nullable=True),
        sa.Column("bill_email", sa.String(length=254), nullable=True),
        sa.Column("bill_address", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("voided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stripe_invoice_id", sa.String(length=64), nullable=True),
        sa.Column("stripe_status", sa.String(length=16), nullable=True),
        sa.Column("stripe_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("number", name=op.f("uq_invoices_number")),
        sa.UniqueConstraint("tenant_id", "period", name=op.f("uq_invoices_tenant_id")),
    )
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.create_index("ix_invoices_period_status", ["period", "status"], unique=False)

    op.create_table(
        "tenant_billing",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column("address", sa.Text(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("stripe_customer_id", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenant_billing")),
    )
    op.create_table(
        "invoice_lines",
        sa.Column("invoice_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("meter", sa.String(length=16), nullable=False),
        sa.Column("price_id", sa.String(length=64), nullable=True),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("unit", sa.String(length=16), nullable=False),
        sa.Column("unit_price_usd", sa.String(length=64), nullable=True),
        sa.Column("amount_usd", sa.String(length=64), nullable=False),
        sa.Column("usage_period", sa.String(length=7), nullable=False),
        sa.Column("late", sa.Boolean(), nullable=False),
        sa.Column("stripe_item_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("invoice_id", "position", name=op.f("pk_invoice_lines")),
    )


def downgrade() -> None:
    op.drop_table("invoice_lines")
    op.drop_table("tenant_billing")
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_index("ix_invoices_period_status")

    op.drop_table("invoices")
    op.drop_table("invoice_periods")
    op.drop_table("invoice_counters")
