"""Budgets, the alerts they fired, and the durable outbox of alert deliveries.

- `budgets`: one row per budget (tenant-wide when `project_id` is null). Money is exact
  text (`DecimalText`); thresholds and channels are JSON. `deleted_at` ends a budget
  (`DELETE /v1/budgets/{id}`); the row stays so its alerts keep their history.
- `budget_alerts`: one row per firing. The unique key (budget, period, kind, threshold,
  arm) is what makes "each threshold once per budget per period" hold across restarts and
  across several API replicas: a second writer of the same firing gets an integrity error.
  `arm` counts re-arms: raising a budget's amount re-arms thresholds no longer crossed
  (`rearmed_at` is set on the old row), and the next firing of that threshold takes the
  next `arm`.
- `alert_deliveries`: one row per (alert, channel), written in the same transaction as
  its alert: the outbox. A worker claims due rows with a lease, sends, and records the
  outcome; a row is retried with backoff and jitter until it is delivered or its attempts
  run out. `body` holds the exact bytes to send, so every retry (and its signature) is
  identical.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from billing.db import Base, DecimalText, UTCDateTime, utcnow


class BudgetRow(Base):
    __tablename__ = "budgets"
    __table_args__ = (Index("ix_budgets_tenant_id_project_id", "tenant_id", "project_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    amount_usd: Mapped[Decimal] = mapped_column(DecimalText)
    period: Mapped[str] = mapped_column(String(16), default="monthly")
    # Decimal strings, ascending, each in (0, 1]: ["0.5", "0.8", "1"].
    thresholds: Mapped[list[str]] = mapped_column(JSON)
    hard_limit: Mapped[bool] = mapped_column(Boolean, default=False)
    # [{"type": "webhook", "url", "secret"}, {"type": "slack", "url"}, {"type": "email", "to"}]
    channels: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class BudgetAlertRow(Base):
    __tablename__ = "budget_alerts"
    __table_args__ = (UniqueConstraint("budget_id", "period", "kind", "threshold", "arm"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    budget_id: Mapped[str] = mapped_column(ForeignKey("budgets.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    period: Mapped[str] = mapped_column(String(7))  # YYYY-MM
    kind: Mapped[str] = mapped_column(String(16))  # threshold | forecast
    threshold: Mapped[str] = mapped_column(String(16))  # "0.8"; "" for a forecast alert
    arm: Mapped[int] = mapped_column(Integer, default=0)
    spend_usd: Mapped[Decimal] = mapped_column(DecimalText)
    amount_usd: Mapped[Decimal] = mapped_column(DecimalText)
    forecast_usd: Mapped[Decimal | None] = mapped_column(DecimalText, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    rearmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AlertDeliveryRow(Base):
    __tablename__ = "alert_deliveries"
    __table_args__ = (
        UniqueConstraint("alert_id", "channel_index"),
        Index("ix_alert_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    alert_id: Mapped[str] = mapped_column(ForeignKey("budget_alerts.id", ondelete="CASCADE"))
    channel_index: Mapped[int] = mapped_column(Integer)
    # The channel as it was when the alert fired (type, url/to, secret): later edits of
    # the budget do not change a delivery already owed.
    channel: Mapped[dict[str, Any]] = mapped_column(JSON)
    body: Mapped[str] = mapped_column(Text)  # the exact bytes sent (UTF-8 JSON)
    # pending, sending (leased), delivered, failed (attempts exhausted)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
