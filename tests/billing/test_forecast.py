"""The month-end forecast follows the daily and weekly cycle (billing/budgets/forecast.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from billing.budgets.forecast import build_profile, month_end_forecast, next_month_start

HOUR = timedelta(hours=1)


def _series(start: datetime, end: datetime, spend_at: object) -> dict[datetime, Decimal]:
    out = {}
    t = start
    while t < end:
        out[t] = spend_at(t)  # type: ignore[operator]
        t += HOUR
    return out


def test_weekly_cycle_weekdays_cost_more_than_weekends() -> None:
    # $2/h on weekdays 09-17 UTC, $0 otherwise; 4 weeks of history.
    def spend(t: datetime) -> Decimal:
        return Decimal(2) if t.weekday() < 5 and 9 <= t.hour < 17 else Decimal(0)

    now = datetime(2026, 11, 14, 0, 0, tzinfo=UTC)  # a Saturday, midnight
    history = _series(now - timedelta(days=28), now, spend)
    profile = build_profile(history, now)
    assert profile.kind == "weekly"
    rest = profile.expected(now, next_month_start(now))
    # Nov 14-30: 12 weekdays (16-20, 23-27, 30 ... count them) x 8 h x $2
    weekdays = sum(1 for d in range(14, 31) if datetime(2026, 11, d, tzinfo=UTC).weekday() < 5)
    assert rest == Decimal(weekdays * 8 * 2)
    spent = sum(v for t, v in history.items() if t.month == 11)
    assert month_end_forecast(spent, history, now) == spent + rest
    # A flat run-rate would have said spent / 13 days x 30 days: different.
    assert month_end_forecast(spent, history, now) != spent / 13 * 30


def test_recent_weeks_weigh_more() -> None:
    now = datetime(2026, 11, 29, 0, 0, tzinfo=UTC)
    # $1/h for three weeks, then $5/h in the last week: level moved up.
    history = _series(
        now - timedelta(days=28),
        now,
        lambda t: Decimal(5) if t >= now - timedelta(days=7) else Decimal(1),
    )
    profile = build_profile(history, now)
    # weights 4 (last week), 3, 2, 1 -> (5x4 + 1x3 + 1x2 + 1x1) / 10 = 2.6 per hour
    assert profile.expected(now, now + HOUR) == Decimal("2.6")


def test_daily_cycle_with_a_few_days_of_history() -> None:
    now = datetime(2026, 11, 20, 12, 30, tzinfo=UTC)
    history = _series(
        now.replace(minute=0) - timedelta(days=3),
        now.replace(minute=0),
        lambda t: Decimal(3) if t.hour == 12 else Decimal(0),
    )
    profile = build_profile(history, now)
    assert profile.kind == "daily"
    # the rest of the 12:00 hour (half of $3), then 10 more days' 12:00 hours
    assert profile.expected(now, next_month_start(now)) == Decimal("1.5") + 10 * 3


def test_short_history_is_flat_and_none_is_zero() -> None:
    now = datetime(2026, 11, 30, 20, 0, tzinfo=UTC)
    history = {now - HOUR * 2: Decimal(4), now - HOUR: Decimal(2)}
    profile = build_profile(history, now)
    assert profile.kind == "flat"
    assert profile.expected(now, next_month_start(now)) == Decimal(4 * 3)  # $3/h, 4 h left
    assert month_end_forecast(Decimal("7.5"), {}, now) == Decimal("7.5")


def test_profiles_equal_a_walk_over_every_hour() -> None:
    """The profile visits only hours with spend and takes the weights from cached slot
    counts; a plain walk over every hour of the span gives the same slots."""
    import random

    from billing.budgets.forecast import _slot, _weight

    rng = random.Random(5)
    for case in range(30):
        now = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(60 * 24 * 40))
        end = now.replace(minute=0, second=0, microsecond=0)
        start = end - HOUR * rng.randrange(1, 28 * 24)
        history = {
            start + HOUR * i: Decimal(rng.randrange(0, 500)) / 100
            for i in range(int((end - start) / HOUR))
            if rng.random() < 0.3
        }
        profile = build_profile(history, now)
        if profile.kind == "none":
            continue
        first = min(h for h, v in history.items() if v)
        size = len(profile.slots)
        sums = [Decimal(0)] * size
        weights = [0] * size
        hour = first
        while hour < end:
            slot = _slot(hour, profile.kind)
            w = _weight(hour, end, profile.kind)
            sums[slot] += history.get(hour, Decimal(0)) * w
            weights[slot] += w
            hour += HOUR
        walked = [s / w if w else Decimal(0) for s, w in zip(sums, weights, strict=True)]
        assert [round(x, 20) for x in profile.slots] == [round(x, 20) for x in walked], case
