"""The price book (with the default entries from the seed page) and dense tenant numbers.

Default price book (effective 1970-01-01, so any entry posted later overrides it from
its own effective_from). The seed page prices one request two ways: the provider table
(Rerank 4 Pro's page) in $ per 1M input tokens, and a model comparison in $ per 1K
doc-query pairs. Read so that no request is charged twice: `rerank-4-pro` is charged
per input token at the serving provider's rate (output $0, pairs $0); the other models,
which have no token price, per 1K doc-query pairs at their list price (tokens $0).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PROVIDER_INPUT_PER_1M = {"llmapi": "0.05", "cohere": "0.25", "azure": "0.28", "bedrock": "0.30"}
MODEL_PER_1K_PAIRS = {"rerank-3": "0.16", "text-embedding-3-large": "0.14"}


def _defaults() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for provider, per_1m in PROVIDER_INPUT_PER_1M.items():
        prices = [("rerank-4-pro", per_1m, "0")] + [
            (model, "0", per_1k) for model, per_1k in MODEL_PER_1K_PAIRS.items()
        ]
        for model, input_per_1m, per_1k in prices:
            rows.append(
                {
                    "id": f"price_default_{provider}_{model}",
                    "provider": provider,
                    "model": model,
                    "effective_from": EPOCH,
                    "currency": "USD",
                    "input_per_1m_tokens": input_per_1m,
                    "output_per_1m_tokens": "0",
                    "per_1k_doc_query_pairs": per_1k,
                    "created_at": EPOCH,
                }
            )
    return rows


def upgrade() -> None:
    prices = op.create_table(
        "prices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("input_per_1m_tokens", sa.String(length=64), nullable=False),
        sa.Column("output_per_1m_tokens", sa.String(length=64), nullable=False),
        sa.Column("per_1k_doc_query_pairs", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prices")),
        sa.UniqueConstraint("provider", "model", "effective_from", name=op.f("uq_prices_provider")),
    )
    op.bulk_insert(prices, _defaults())
    op.create_table(
        "tenant_numbers",
        sa.Column("num", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_tenant_numbers_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("num", name=op.f("pk_tenant_numbers")),
        sa.UniqueConstraint("tenant_id", name=op.f("uq_tenant_numbers_tenant_id")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("tenant_numbers")
    op.drop_table("prices")
