"""The price book's table: effective-dated prices per (provider, model)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from billing.db import Base, DecimalText, UTCDateTime, utcnow


class PriceRow(Base):
    """One entry: from `effective_from` on, until a later entry of the same (provider,
    model) takes over. Entries are never edited or deleted: a price change is a new entry,
    so every past figure can be recomputed from the book as it stands."""

    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("provider", "model", "effective_from"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime)
    currency: Mapped[str] = mapped_column(String(3))
    input_per_1m_tokens: Mapped[Decimal] = mapped_column(DecimalText)
    output_per_1m_tokens: Mapped[Decimal] = mapped_column(DecimalText)
    per_1k_doc_query_pairs: Mapped[Decimal] = mapped_column(DecimalText)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
