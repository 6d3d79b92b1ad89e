"""Tenants (developer accounts that pay) and their projects."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from billing.db import Base, UTCDateTime, utcnow


class Tenant(Base):
    """A developer account that pays; registered on first sight of its events."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Project(Base):
    """A tenant's project; registered on first sight of its events."""

    __tablename__ = "projects"

    tenant_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TenantNumber(Base):
    """A dense number per tenant, handed out once by the relational store (a sequence
    on PostgreSQL, the rowid on SQLite) and shared by every API replica. ClickHouse keeps
    a copy (`tenant_numbers`) and stamps it on each event row, so distinct accounts are
    counted exactly with Roaring bitmaps instead of hashing tenant ids."""

    __tablename__ = "tenant_numbers"
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012

    num: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("tenants.id", ondelete="CASCADE"), unique=True
    )
