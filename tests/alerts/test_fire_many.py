"""The alert worker's batch of crossings (`service.fire_many`), on SQLite and PostgreSQL.

One tick can cross thousands of thresholds at once (a month's first traffic, a price
raise): the batch must record exactly what one-at-a-time firing would, in a few
statements, and record nothing when another process fired one of them meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from billing.alerts.store import body_for
from billing.budgets import service
from billing.budgets.models import AlertDeliveryRow, BudgetAlertRow, BudgetRow
from tests.alerts.conftest import payload_of

AT = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
PERIOD = "2026-11"
CHANNELS: list[dict[str, Any]] = [
    {"type": "webhook", "url": "https://hooks.example.com/b", "secret": "s3cret"},
    {"type": "email", "to": "ops@example.com"},
]


def _budgets(sessions: sessionmaker[Session], n: int) -> list[str]:
    ids = [f"bud_{i:06d}" for i in range(n)]
    with sessions.begin() as session:
        session.add_all(
            BudgetRow(
                id=budget_id,
                tenant_id=f"t{i}",
                project_id=None if i % 2 else "search",
                amount_usd=Decimal("10"),
                thresholds=["0.5", "0.8", "1"],
                hard_limit=False,
                channels=CHANNELS,
            )
            for i, budget_id in enumerate(ids)
        )
    return ids


def _alert(budget_id: str, threshold: str, arm: int, rearmed: datetime | None) -> BudgetAlertRow:
    return BudgetAlertRow(
        id=f"alr_{budget_id}_{threshold}_{arm}",
        budget_id=budget_id,
        tenant_id="t",
        project_id=None,
        period=PERIOD,
        kind="threshold",
        threshold=threshold,
        arm=arm,
        spend_usd=Decimal("6"),
        amount_usd=Decimal("10"),
        at=AT - timedelta(days=1),
        rearmed_at=rearmed,
    )


def _firing(budget_id: str, threshold: str) -> service.Firing:
    spend = Decimal(threshold) * 10 + Decimal("0.000123")
    return service.Firing(budget_id, "threshold", Decimal(threshold), spend, None, AT)


@contextmanager
def _statements(sessions: sessionmaker[Session]) -> Iterator[list[str]]:
    seen: list[str] = []
    engine = sessions.kw["bind"]

    def count(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_large_batch_records_what_one_at_a_time_would_in_a_few_statements(
    sessions: sessionmaker[Session],
) -> None:
    ids = _budgets(sessions, 1_203)  # more than two IN (...) chunks
    fired_before, rearmed, deleted = ids[0], ids[1], ids[2]
    with sessions.begin() as session:
        session.add(_alert(fired_before, "0.5", 0, None))
        session.add(_alert(rearmed, "0.5", 0, AT - timedelta(hours=1)))
        session.get_one(BudgetRow, deleted).deleted_at = AT - timedelta(hours=2)
    firings = [_firing(budget_id, t) for budget_id in ids for t in ("0.5", "0.8")]
    firings.append(_firing(ids[3], "0.8"))  # a repeat within the batch fires nothing

    with sessions() as session, _statements(sessions) as statements:
        out = service.fire_many(session, firings)
    assert out is not None and len(out) == len(firings)
    # Before: about five statements per firing (2,407 firings). Now: the reads in chunks
    # of 500, then the inserts in batches.
    assert len(statements) <= 30, len(statements)

    by_key = {(f.budget_id, str(f.threshold)): a for f, a in zip(firings[:-1], out, strict=False)}
    assert by_key[(fired_before, "0.5")] is None
    assert by_key[(fired_before, "0.8")] is not None
    assert by_key[(deleted, "0.5")] is None and by_key[(deleted, "0.8")] is None
    assert out[-1] is None and by_key[(ids[3], "0.8")] is not None
    new = [a for a in out if a is not None]
    assert len(new) == 2 * len(ids) - 3

    with sessions() as session:
        alerts = {a.id: a for a in session.scalars(select(BudgetAlertRow))}
        deliveries = list(session.scalars(select(AlertDeliveryRow)))
    assert len(alerts) == len(new) + 2
    again = alerts[by_key[(rearmed, "0.5")].id]  # type: ignore[union-attr]
    assert again.arm == 1 and again.rearmed_at is None
    for f in firings[:-1]:
        alert = by_key[(f.budget_id, str(f.threshold))]
        if alert is None:
            continue
        stored = alerts[alert.id]
        assert (stored.spend_usd, stored.amount_usd, stored.period) == (
            f.spend,
            Decimal("10"),
            PERIOD,
        )
        assert stored.threshold == str(f.threshold) and stored.at == AT
    # Each alert owes one pending delivery per channel, whose body is the contract's
    # payload for that channel, due at the firing.
    assert len(deliveries) == 2 * len(new)
    for row in deliveries:
        alert = alerts[row.alert_id]
        assert row.status == "pending" and row.attempts == 0 and row.next_attempt_at == AT
        channel = CHANNELS[row.channel_index]
        assert row.channel == channel
        payload = payload_of(alert) | {"at": service.iso(alert.at)}  # as the service writes it
        assert row.body == body_for(channel, payload)
    webhook = next(r for r in deliveries if r.channel_index == 0)
    assert json.loads(webhook.body)["spend_usd"] == format(alerts[webhook.alert_id].spend_usd, "f")


def test_a_batch_records_nothing_when_another_process_fired_one_meanwhile(
    sessions: sessionmaker[Session], second_sessions: sessionmaker[Session]
) -> None:
    ids = _budgets(sessions, 40)
    with sessions() as session:
        # The batch reads the period's alerts first; the other process fires after that.
        original = service._new_alert
        raced_once: list[bool] = []

        def raced(row: BudgetRow, f: service.Firing, earlier: Any) -> Any:
            if f.budget_id == ids[17] and f.threshold == Decimal("0.8") and not raced_once:
                raced_once.append(True)
                with second_sessions() as other:
                    assert service.fire(
                        other,
                        other.get_one(BudgetRow, ids[17]),
                        kind="threshold",
                        threshold=Decimal("0.8"),
                        spend=Decimal("8.5"),
                        forecast=None,
                        at=AT,
                    )
            return original(row, f, earlier)

        service._new_alert = raced  # type: ignore[assignment]
        try:
            out = service.fire_many(session, [_firing(i, t) for i in ids for t in ("0.5", "0.8")])
        finally:
            service._new_alert = original  # type: ignore[assignment]
    assert out is None and raced_once
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(BudgetAlertRow)) == 1
        assert session.scalar(select(func.count()).select_from(AlertDeliveryRow)) == 2
