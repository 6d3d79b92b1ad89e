"""The outbox table's writes and reads: deliveries enqueued with their alert, and shown.

`enqueue` runs inside the caller's transaction (the one that writes the alert), so an
alert and the deliveries it owes are committed together or not at all. `deliveries_for`
is what `GET /v1/budgets/{id}` shows of each alert's deliveries.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.alerts import messages
from billing.alerts.channels import masked_slack_url
from billing.budgets.models import AlertDeliveryRow, BudgetAlertRow
from billing.db import utcnow

D = AlertDeliveryRow


def new_delivery_id() -> str:
    return "dlv_" + secrets.token_hex(12)


def body_for(channel: dict[str, Any], payload: dict[str, Any]) -> str:
    kind = channel.get("type")
    if kind == "webhook":
        return messages.webhook_body(payload)
    if kind == "slack":
        return messages.slack_body(payload)
    if kind == "email":
        return messages.email_body(payload)
    raise ValueError(f"unknown channel type {kind!r}")


def enqueue(
    session: Session,
    alert: BudgetAlertRow,
    channels: list[dict[str, Any]],
    payload: dict[str, Any],
) -> list[AlertDeliveryRow]:
    """Add one pending delivery per channel; the caller commits it with the alert.

    The alert is added and flushed first (the unit of work does not order rows of tables
    without a relationship by their foreign key); a second writer of the same firing
    gets its IntegrityError here, before any delivery is added.
    """
    session.add(alert)
    session.flush()
    rows = pending_deliveries(alert, channels, payload, utcnow())
    session.add_all(rows)
    return rows


def pending_deliveries(
    alert: BudgetAlertRow,
    channels: list[dict[str, Any]],
    payload: dict[str, Any],
    now: datetime,
) -> list[AlertDeliveryRow]:
    """The deliveries an alert owes, one per channel, not yet added to any session (the
    caller adds them after the alert's row is flushed: see `enqueue`)."""
    # Due at once on the caller's clock and on the wall clock, whichever is earlier.
    due = min(alert.at, now) if alert.at is not None else now
    return [
        AlertDeliveryRow(
            id=new_delivery_id(),
            alert_id=alert.id,
            channel_index=index,
            channel=dict(channel),
            body=body_for(channel, payload),
            status="pending",
            attempts=0,
            next_attempt_at=due,
            lease_until=None,
            created_at=now,
        )
        for index, channel in enumerate(channels)
    ]


def target(channel: dict[str, Any]) -> str:
    if channel.get("type") == "slack":
        return masked_slack_url(str(channel.get("url", "")))
    return str(channel.get("url") or channel.get("to") or "")


def log_target(channel: dict[str, Any]) -> str:
    """Where a delivery goes, for logs: a URL's origin only (Slack URLs are secrets)."""
    if "url" in channel:
        parts = urlsplit(str(channel["url"]))
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return str(channel.get("to"))


def deliveries_for(session: Session, alert_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Per alert id, its deliveries as the API shows them (in channel order)."""
    result: dict[str, list[dict[str, Any]]] = {alert_id: [] for alert_id in alert_ids}
    ids = list(result)
    for start in range(0, len(ids), 500):
        rows = session.scalars(
            select(D)
            .where(D.alert_id.in_(ids[start : start + 500]))
            .order_by(D.alert_id, D.channel_index)
        )
        for row in rows:
            result[row.alert_id].append(
                {
                    "channel": row.channel.get("type"),
                    "target": target(row.channel),
                    "status": row.status,
                    "attempts": row.attempts,
                    "last_error": row.last_error,
                    "delivered_at": (
                        messages.rfc3339(row.delivered_at) if row.delivered_at else None
                    ),
                }
            )
    return result
