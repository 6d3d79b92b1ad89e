"""Budgets in the relational database: create, edit, end, list; fire alerts once.

Firing is decided by the database, not by process memory: an alert row's unique key
(budget, period, kind, threshold, arm) admits one firing per threshold per period however
many workers or replicas try at once; the loser's insert fails and it sends nothing. The
alert and its deliveries (the outbox) are written in one transaction.

Editing (PATCH) keeps the period's spend (spend is never stored on the budget: it is the
events'). Raising the amount re-arms every threshold of the current period that the spend
no longer crosses under the new amount (it may fire again if spend reaches it).
Lowering the amount re-arms nothing: thresholds that the spend now crosses fire at once,
each still at most once per period; the forecast alert is once per period either way.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.alerts.outbox import enqueue, pending_deliveries
from billing.budgets.forecast import period_of
from billing.budgets.ledger import Limit, pause
from billing.budgets.models import BudgetAlertRow, BudgetRow
from billing.db import utcnow
from billing.rating import money

_IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's and PostgreSQL's limits
THRESHOLD_TYPE = "budget.threshold_crossed"
FORECAST_TYPE = "budget.forecast_exceeded"


def threshold_text(value: Decimal) -> str:
    return format(value.normalize(), "f")


def to_limit(row: BudgetRow) -> Limit:
    return Limit(
        row.id,
        row.tenant_id,
        row.project_id,
        row.amount_usd,
        row.hard_limit,
        tuple(sorted(Decimal(t) for t in row.thresholds)),
    )


@dataclass(frozen=True)
class NewBudget:
    tenant_id: str
    project_id: str | None
    amount_usd: Decimal
    thresholds: Sequence[Decimal]
    hard_limit: bool
    channels: list[dict[str, Any]]


def create(session: Session, new: NewBudget, now: datetime) -> BudgetRow:
    row = BudgetRow(
        id="bud_" + secrets.token_hex(12),
        tenant_id=new.tenant_id,
        project_id=new.project_id,
        amount_usd=new.amount_usd,
        period="monthly",
        thresholds=sorted({threshold_text(t) for t in new.thresholds}, key=Decimal),
        hard_limit=new.hard_limit,
        channels=new.channels,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row


def get(session: Session, budget_id: str) -> BudgetRow | None:
    row = session.get(BudgetRow, budget_id)
    return row if row is not None and row.deleted_at is None else None


def live(session: Session, tenant_id: str | None = None) -> list[BudgetRow]:
    query = select(BudgetRow).where(BudgetRow.deleted_at.is_(None))
    if tenant_id is not None:
        query = query.where(BudgetRow.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(BudgetRow.created_at, BudgetRow.id)))


def live_versions(session: Session) -> dict[str, datetime]:
    """Each live budget's `updated_at` (every edit and the end set it): the minute's
    reload reads whole rows only of budgets that are new or changed since."""
    query = (
        select(BudgetRow.id, BudgetRow.updated_at)
        .where(BudgetRow.deleted_at.is_(None))
        .order_by(BudgetRow.created_at, BudgetRow.id)
    )
    versions: dict[str, datetime] = {}
    for part in session.execute(query).partitions(500):
        versions.update(part)
        pause()
    return versions


def live_by_ids(session: Session, ids: Sequence[str]) -> list[BudgetRow]:
    """The live budgets among `ids` (read in chunks of 500: a bound parameter each)."""
    rows: list[BudgetRow] = []
    for start in range(0, len(ids), 500):
        chunk = list(ids[start : start + 500])
        query = select(BudgetRow).where(BudgetRow.id.in_(chunk), BudgetRow.deleted_at.is_(None))
        rows.extend(session.scalars(query))
    return rows


def update(
    session: Session,
    row: BudgetRow,
    changes: dict[str, Any],
    spend: Decimal,
    now: datetime,
) -> None:
    """Apply a PATCH. Raising the amount re-arms the current period's thresholds that
    `spend` no longer crosses."""
    old_amount = row.amount_usd
    if "amount_usd" in changes:
        row.amount_usd = changes["amount_usd"]
    if "thresholds" in changes:
        row.thresholds = sorted({threshold_text(t) for t in changes["thresholds"]}, key=Decimal)
    if "hard_limit" in changes:
        row.hard_limit = changes["hard_limit"]
    if "channels" in changes:
        row.channels = changes["channels"]
    row.updated_at = now
    if row.amount_usd > old_amount:
        period = period_of(now)
        for alert in session.scalars(
            select(BudgetAlertRow).where(
                BudgetAlertRow.budget_id == row.id,
                BudgetAlertRow.period == period,
                BudgetAlertRow.kind == "threshold",
                BudgetAlertRow.rearmed_at.is_(None),
            )
        ):
            if spend < Decimal(alert.threshold) * row.amount_usd:
                alert.rearmed_at = now
    session.flush()


def end(session: Session, row: BudgetRow, now: datetime) -> None:
    row.deleted_at = now
    row.updated_at = now
    session.flush()


def armed_firings(session: Session, period: str) -> set[tuple[str, str, str]]:
    """(budget id, kind, threshold) already fired in `period` and not re-armed."""
    rows = session.execute(
        select(BudgetAlertRow.budget_id, BudgetAlertRow.kind, BudgetAlertRow.threshold).where(
            BudgetAlertRow.period == period, BudgetAlertRow.rearmed_at.is_(None)
        )
    )
    return {(b, k, t) for b, k, t in rows}


def fire(
    session: Session,
    row: BudgetRow,
    *,
    kind: str,
    threshold: Decimal | None,
    spend: Decimal,
    forecast: Decimal | None,
    at: datetime,
) -> BudgetAlertRow | None:
    """Record one firing and its deliveries, committed; None if it had fired already
    (here or in another process)."""
    try:
        alert = _record(
            session, row, kind=kind, threshold=threshold, spend=spend, forecast=forecast, at=at
        )
        if alert is not None:
            session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return alert


@dataclass(frozen=True)
class Firing:
    budget_id: str
    kind: str
    threshold: Decimal | None
    spend: Decimal
    forecast: Decimal | None
    at: datetime


def fire_many(session: Session, firings: Sequence[Firing]) -> list[BudgetAlertRow | None] | None:
    """`fire` for several budgets in one transaction (the alert worker's crossings of one
    tick): per firing the alert, None if it had fired already or the budget is gone.
    None as a whole if another process fired one of them meanwhile (a unique row
    refused): nothing is recorded then, and the caller fires them one at a time.

    A tick that crosses thousands of thresholds at once (a month's first traffic, a price
    raise) reads the budgets and their period's alerts a few hundred at a time and
    inserts the alerts, then their deliveries, in one batch each: a few statements, not
    about 3.5 per firing through the ORM (each firing cost ~0.7 ms of the GIL, which
    the ingest path shares, and every statement let another thread take it)."""
    budgets: dict[str, BudgetRow] = {}
    earlier: dict[tuple[str, str, str, str], list[BudgetAlertRow]] = {}
    periods = sorted({period_of(f.at) for f in firings})
    ids = sorted({f.budget_id for f in firings})
    try:
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            for row in session.scalars(
                select(BudgetRow).where(BudgetRow.id.in_(chunk), BudgetRow.deleted_at.is_(None))
            ):
                budgets[row.id] = row
            for alert in session.scalars(
                select(BudgetAlertRow).where(
                    BudgetAlertRow.budget_id.in_(chunk), BudgetAlertRow.period.in_(periods)
                )
            ):
                key = (alert.budget_id, alert.period, alert.kind, alert.threshold)
                earlier.setdefault(key, []).append(alert)
        out: list[BudgetAlertRow | None] = []
        owed: list[tuple[BudgetAlertRow, list[dict[str, Any]], dict[str, Any]]] = []
        for f in firings:
            budget = budgets.get(f.budget_id)
            made = None if budget is None else _new_alert(budget, f, earlier)
            if made is None or budget is None:
                out.append(None)
                continue
            alert, payload = made
            out.append(alert)
            owed.append((alert, list(budget.channels), payload))
        if owed:
            # Alerts first, flushed (the deliveries' foreign key; a unique row another
            # process just wrote fails here), then every delivery.
            session.add_all([alert for alert, _, _ in owed])
            session.flush()
            now = utcnow()
            for alert, channels, payload in owed:
                session.add_all(pending_deliveries(alert, channels, payload, now))
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return out


def _record(
    session: Session,
    row: BudgetRow,
    *,
    kind: str,
    threshold: Decimal | None,
    spend: Decimal,
    forecast: Decimal | None,
    at: datetime,
) -> BudgetAlertRow | None:
    """Add one firing and its deliveries to the session (flushed, not committed); None
    if it had fired already. Raises IntegrityError if another process just fired it."""
    firing = Firing(row.id, kind, threshold, spend, forecast, at)
    period = period_of(at)
    t = threshold_text(threshold) if threshold is not None else ""
    rows = session.scalars(
        select(BudgetAlertRow).where(
            BudgetAlertRow.budget_id == row.id,
            BudgetAlertRow.period == period,
            BudgetAlertRow.kind == kind,
            BudgetAlertRow.threshold == t,
        )
    )
    made = _new_alert(row, firing, {(row.id, period, kind, t): list(rows)})
    if made is None:
        return None
    alert, payload = made
    enqueue(session, alert, list(row.channels), payload)
    return alert


def _new_alert(
    row: BudgetRow,
    f: Firing,
    earlier: dict[tuple[str, str, str, str], list[BudgetAlertRow]],
) -> tuple[BudgetAlertRow, dict[str, Any]] | None:
    """The alert row of a firing and the payload its channels are sent, or None if this
    threshold (or the forecast) fired in the period and was not re-armed since.
    `earlier` holds the period's alerts by (budget, period, kind, threshold); the new
    alert joins it, so a repeat in the same batch fires nothing."""
    period = period_of(f.at)
    t = threshold_text(f.threshold) if f.threshold is not None else ""
    before = earlier.setdefault((row.id, period, f.kind, t), [])
    if any(a.rearmed_at is None for a in before):
        return None
    alert = BudgetAlertRow(
        id="alr_" + secrets.token_hex(12),
        budget_id=row.id,
        tenant_id=row.tenant_id,
        project_id=row.project_id,
        period=period,
        kind=f.kind,
        threshold=t,
        arm=len(before),
        spend_usd=f.spend,
        amount_usd=row.amount_usd,
        forecast_usd=f.forecast,
        at=f.at,
    )
    before.append(alert)
    payload: dict[str, Any] = {
        "type": THRESHOLD_TYPE if f.kind == "threshold" else FORECAST_TYPE,
        "budget_id": row.id,
        "tenant_id": row.tenant_id,
        "project_id": row.project_id,
        "threshold": float(f.threshold) if f.threshold is not None else None,
        "spend_usd": money(f.spend),
        "amount_usd": money(row.amount_usd),
        "period": period,
        "at": iso(f.at),
    }
    if f.forecast is not None:
        payload["forecast_usd"] = money(f.forecast)
    return alert, payload


def alerts_of(session: Session, budget_id: str) -> list[BudgetAlertRow]:
    return list(
        session.scalars(
            select(BudgetAlertRow)
            .where(BudgetAlertRow.budget_id == budget_id)
            .order_by(BudgetAlertRow.at, BudgetAlertRow.id)
        )
    )


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
