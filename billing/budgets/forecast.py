"""Month-end spend forecast that follows the traffic's daily and weekly cycle.

A flat run-rate (spend so far / days elapsed x days in month) is wrong twice over for
rerank traffic: it misses the weekly cycle (a month that starts on a weekend under-
forecasts, one that ends on a weekend over-forecasts) and it lags any change in level by
weeks. The method here is seasonal:

1. History: the scope's spend per UTC hour over the last 28 days before `now` (complete
   hours only), starting at its first hour with spend (a new account has a short history).
2. Profile of expected spend per hour:
   - with 7 days of history or more: per (weekday, hour-of-day) slot, the weighted mean of
     that slot over the weeks seen, the most recent week weighing most (weights 4, 3, 2,
     1 by age), so a change in level shows within days;
   - with 1 to 7 days: per hour-of-day, the mean over the days seen (daily cycle only);
   - with less than a day: the mean hourly spend of the hours seen (flat);
   - with no spend at all: nothing more is expected.
3. Forecast = spend so far in the month + the profile summed over the rest of the month
   (the rest of the current hour pro rata, then every remaining hour).

Figures are exact decimals up to the divisions of the means; the result is rounded to
micro-dollars (1e-6 USD). Prices are already in the history (it is spend), so a price
change shows in the forecast as it shows in the spend of the following hours.
"""

from __future__ import annotations

import decimal
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

HISTORY_DAYS = 28
HOUR = timedelta(hours=1)
_MICRO = Decimal("0.000001")
_CTX = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)

ProfileKind = Literal["weekly", "daily", "flat", "none"]


def month_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def next_month_start(at: datetime) -> datetime:
    start = month_start(at)
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


def period_of(at: datetime) -> str:
    """The calendar month (UTC) holding `at`: "YYYY-MM"."""
    at = at.astimezone(UTC)
    return f"{at.year:04d}-{at.month:02d}"


def _hour_floor(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _slot(hour: datetime, kind: ProfileKind) -> int:
    if kind == "weekly":
        return hour.weekday() * 24 + hour.hour
    if kind == "daily":
        return hour.hour
    return 0


@dataclass(frozen=True)
class Profile:
    """Expected spend per hour, by slot (168 weekly slots, 24 daily ones, or 1)."""

    kind: ProfileKind
    slots: tuple[Decimal, ...]

    def expected(self, start: datetime, end: datetime) -> Decimal:
        """Expected spend in [start, end): partial first hour pro rata, whole hours after."""
        if self.kind == "none" or end <= start:
            return Decimal(0)
        total = Decimal(0)
        hour = _hour_floor(start)
        if start > hour:  # the rest of the current hour
            left = Decimal((min(end, hour + HOUR) - start).total_seconds()) / 3600
            total = _CTX.add(total, _CTX.multiply(self.slots[_slot(hour, self.kind)], left))
            hour += HOUR
        # The remaining whole hours counted per slot (shared by every profile of this
        # kind: a cached walk), then one multiplication per slot.
        whole = int((end - hour) / HOUR) if end > hour else 0
        counts = _slot_counts(self.kind, hour, whole)
        for count, value in zip(counts, self.slots, strict=True):
            if count:
                total = _CTX.add(total, _CTX.multiply(value, Decimal(count)))
        hour += HOUR * whole
        if hour < end:  # a partial last hour (an `end` that is not on the hour)
            left = Decimal((end - hour).total_seconds()) / 3600
            total = _CTX.add(total, _CTX.multiply(self.slots[_slot(hour, self.kind)], left))
        return total


@functools.lru_cache(maxsize=4096)
def _slot_counts(kind: ProfileKind, first: datetime, hours: int) -> tuple[int, ...]:
    """How many of the `hours` whole hours from `first` fall in each slot of `kind`."""
    size = 168 if kind == "weekly" else 24 if kind == "daily" else 1
    counts = [0] * size
    hour = first
    for _ in range(hours):
        counts[_slot(hour, kind)] += 1
        hour += HOUR
    return tuple(counts)


def build_profile(
    hourly: Mapping[datetime, Decimal], now: datetime, days: int = HISTORY_DAYS
) -> Profile:
    """The expected-spend profile from `hourly` (spend per UTC hour start)."""
    end = _hour_floor(now)  # complete hours only
    window_start = end - timedelta(days=days)
    seen = {
        _hour_floor(h): v for h, v in hourly.items() if window_start <= _hour_floor(h) < end and v
    }
    if not seen:
        return Profile("none", (Decimal(0),))
    first = min(seen)
    span_hours = int((end - first) / HOUR)
    if span_hours >= 7 * 24:
        kind: ProfileKind = "weekly"
        size = 168
    elif span_hours >= 24:
        kind, size = "daily", 24
    else:
        kind, size = "flat", 1
    # Only the hours with spend are visited; the weights of every hour of the span
    # (spent or not) come from cached counts of hours per slot, band by band.
    sums = [Decimal(0)] * size
    for hour, value in seen.items():
        sums[_slot(hour, kind)] = _CTX.add(
            sums[_slot(hour, kind)], _CTX.multiply(value, Decimal(_weight(hour, end, kind)))
        )
    weights = [0] * size
    for band_start, band_end, weight in _bands(first, end, kind):
        hours = int((band_end - band_start) / HOUR)
        for slot, count in enumerate(_slot_counts(kind, band_start, hours)):
            weights[slot] += count * weight
    slots = tuple(
        _CTX.divide(s, Decimal(w)) if w else Decimal(0) for s, w in zip(sums, weights, strict=True)
    )
    return Profile(kind, slots)


WEEK = timedelta(days=7)


def _weight(hour: datetime, end: datetime, kind: ProfileKind) -> int:
    """Weekly profiles weigh each hour by its age in weeks: 4 for the last 7 days, then
    3, 2, 1; the others weigh every hour alike."""
    if kind != "weekly":
        return 1
    return 4 - min(3, int((end - hour - HOUR) / WEEK))


def _bands(
    first: datetime, end: datetime, kind: ProfileKind
) -> list[tuple[datetime, datetime, int]]:
    """[first, end) cut where the weight changes: (start, end, weight) per band."""
    if kind != "weekly":
        return [(first, end, 1)]
    out = []
    for age in range(4):
        band_end = end - WEEK * age
        band_start = max(first, end - WEEK * (age + 1)) if age < 3 else first
        if band_start < band_end:
            out.append((band_start, band_end, 4 - age))
    return out


def month_end_forecast(
    spend_to_date: Decimal, hourly: Mapping[datetime, Decimal], now: datetime
) -> Decimal:
    """Projected spend of the month holding `now`, at its end (see the module's method)."""
    profile = build_profile(hourly, now)
    rest = profile.expected(now.astimezone(UTC), next_month_start(now))
    return _CTX.add(spend_to_date, rest).quantize(_MICRO, context=_CTX)
