"""The time window of a read: `window=24h|7d|30d|90d`, or `from`/`to` (RFC 3339, `[from, to)`).

The default window is the last 30 days, ending now. `from` alone ends now; `to` alone
starts a window's length before it. A window and `from`/`to` together, `from` not
before `to`, a time without an offset or a span over MAX_SPAN are 400s naming the field.
Times are kept to the millisecond, as events are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from metering.errors import ApiError

WINDOWS = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
DEFAULT_WINDOW = "30d"
MAX_SPAN = timedelta(days=800)  # events are accepted up to 400 days old; twice that
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)  # ClickHouse's DateTime64 range, kept simple
LATEST = datetime(2299, 12, 31, tzinfo=UTC)


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    @property
    def span(self) -> timedelta:
        return self.end - self.start


def _ms(t: datetime) -> datetime:
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def parse_time(field: str, value: str) -> datetime:
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, f"{field}: must be an RFC 3339 time with an offset") from None
    if "T" not in text.upper() or parsed.utcoffset() is None:
        raise ApiError(400, f"{field}: must be an RFC 3339 time with an offset")
    try:
        utc = parsed.astimezone(UTC)
    except OverflowError:
        utc = EARLIEST - timedelta(days=1)
    if not EARLIEST <= utc <= LATEST:
        raise ApiError(400, f"{field}: must be between 1970-01-01 and 2299-12-31")
    return _ms(utc)


def resolve(
    window: str | None, start: str | None, end: str | None, now: datetime | None = None
) -> Window:
    now = _ms(now or datetime.now(UTC))
    if window is not None and (start is not None or end is not None):
        raise ApiError(400, "window: give either window or from/to, not both")
    if window is not None and window not in WINDOWS:
        raise ApiError(400, f"window: must be one of {', '.join(WINDOWS)}")
    length = WINDOWS[window or DEFAULT_WINDOW]
    errors: list[str] = []
    t_from = t_to = None
    for field, value in (("from", start), ("to", end)):
        if value is None:
            continue
        try:
            parsed = parse_time(field, value)
        except ApiError as exc:
            errors.extend(exc.errors)
            continue
        if field == "from":
            t_from = parsed
        else:
            t_to = parsed
    if errors:
        raise ApiError(400, errors)
    if t_from is None and t_to is None:
        return Window(now - length, now)
    if t_to is None:
        t_to = now
    if t_from is None:
        t_from = max(t_to - length, EARLIEST)
    if t_from >= t_to:
        raise ApiError(400, "from: must be before to")
    if t_to - t_from > MAX_SPAN:
        raise ApiError(400, f"to: a window spans at most {MAX_SPAN.days} days")
    return Window(t_from, t_to)


def floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def ceil_hour(t: datetime) -> datetime:
    floor = floor_hour(t)
    return floor if floor == t else floor + timedelta(hours=1)


def floor_day(t: datetime) -> datetime:
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


def ceil_day(t: datetime) -> datetime:
    floor = floor_day(t)
    return floor if floor == t else floor + timedelta(days=1)
