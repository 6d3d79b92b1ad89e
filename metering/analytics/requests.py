"""The request log: stored events, newest first, in keyset pages (`GET /v1/requests`).

Order and paging. Rows are ordered by (timestamp desc, event_id desc), a total order
(event_id is unique). A page's cursor carries the last row's (timestamp, event_id), the
window's `from` and `to` fixed by the first page, and a hash of the filters, as urlsafe
base64 of JSON: opaque to clients, but not a secret (tenant scoping is applied to every
page from the caller's key, never read from the cursor). The next page takes the rows
strictly after that position inside the same fixed window, so following `next_cursor`
never repeats a row and never skips one that was stored when the walk passed its
position. Events stored while a client pages:
- with a timestamp at or after the fixed `to` (the usual case: new traffic) they never
  show in this walk; a new walk (no cursor) shows them;
- a late event whose timestamp is older than the cursor's position shows in a later
  page of the same walk;
- a late event whose timestamp falls between the window's `to` and the cursor's
  position was not there when the walk passed that point and is not shown in this walk.

Speed. The table is ordered by (day, tenant_id, project_id, timestamp), so a platform-wide
"newest first" over a whole window would read and sort every row of it. The page is
read in steps back from `to`, each one query bounded by its time range (and its days, the
sort key's first column), until `limit + 1` rows are found or the window's `from` is
reached: first the rest of the newest day (enough for a platform-wide page), then as many
whole days as the rows found so far say the missing ones need, twice over (a sparse
tenant's page takes two steps, not one per day). ClickHouse sorts on (timestamp,
event_id) and reads the other columns of the chosen rows only (lazy materialization).
What a page costs beyond that is reading the granules that hold its rows: a day's rows
are stored by tenant, so the newest rows of the platform, or a sparse tenant's rows over
many days, each sit in a different granule.

A tenant's page (every read key's, and the admin's with `tenant_id=`) is found another
way: the `p_tenant_hourly` projection, keyed by tenant first, says in a few granules how
many of the tenant's events (with the other filters) each hour of the window holds. The
page then reads only the newest hours that hold enough of them, and only those hours'
days of that tenant (the table's key), in one query; a sparse tenant's 30 days cost what
its few busy hours do. Counts of the hours at the window's edges include rows outside it
(or already shown before the cursor), so when the hours read give too few rows, the next
older hours are read for the rest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from clickhouse_connect.driver.client import Client

from metering.analytics.hours_cache import HoursCache
from metering.analytics.window import MAX_SPAN, Window, floor_day, floor_hour
from metering.errors import ApiError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
STATUSES = ("ok", "error")
CURSOR_VERSION = 1
MAX_CURSOR_CHARS = 2048
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The columns of an event as stored, in the order _event() reads them.
_COLUMNS = (
    "event_id, toUnixTimestamp64Milli(timestamp) AS ts, tenant_id, project_id, api_key_id,"
    " provider, model, region, status, http_status, error_type, queries, documents,"
    " input_tokens, output_tokens, latency_ms, fallbacks"
)
# Filters: the SQL of each comes from this table only; its value is a bound parameter.
_FILTER_SQL = {
    "tenant_id": "tenant_id = {tenant_id:String}",
    "project_id": "project_id = {project_id:String}",
    "provider": "provider = {provider:String}",
    "model": "model = {model:String}",
    "status": "status = {status:String}",
}
# Times are bound as Unix milliseconds: no time zone conversion on either side. The day
# bounds repeat the range on the sort key's first column, toDate(timestamp): ClickHouse
# does not derive them from the timestamp range, and without them a tenant filter
# (the key's second column) reads every granule of the step.
_STEP_RANGE = (
    "toDate(timestamp) >= {lo_day:Date} AND toDate(timestamp) <= {hi_day:Date}"
    " AND timestamp >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC')"
    " AND timestamp < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')"
)
_AFTER_CURSOR = (
    "(timestamp < fromUnixTimestamp64Milli({after_ts:Int64}, 'UTC')"
    " OR (timestamp = fromUnixTimestamp64Milli({after_ts:Int64}, 'UTC')"
    " AND event_id < {after_id:String}))"
)
_PAGE = (
    "SELECT {columns} FROM rerank_events WHERE {where}"
    " ORDER BY timestamp DESC, event_id DESC LIMIT {{n:UInt32}}"
    " SETTINGS log_comment = 'analytics.requests'"
)
# A tenant's events per hour of the window, newest first (from p_tenant_hourly: every
# filter column is one of its keys). Hours are bound as whole-hour DateTimes.
_TENANT_HOURS = (
    "SELECT toStartOfHour(timestamp) AS hour, count() FROM rerank_events"
    " WHERE toStartOfHour(timestamp) >= {{h_lo:DateTime('UTC')}}"
    " AND toStartOfHour(timestamp) < {{h_hi:DateTime('UTC')}} AND {where}"
    " GROUP BY hour ORDER BY hour DESC"
    " SETTINGS log_comment = 'analytics.requests.hours'"
)
# Those hours only, and their days (the sort key's first column, so that with the tenant
# (its second) only the tenant's granules of those days are read).
_HOURS_RANGE = (
    "toDate(timestamp) IN {days:Array(Date)}"
    " AND toStartOfHour(timestamp) IN {hours:Array(DateTime('UTC'))}"
    " AND timestamp >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC')"
    " AND timestamp < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')"
)


@dataclass(frozen=True)
class Filters:
    tenant_id: str | None = None
    project_id: str | None = None
    provider: str | None = None
    model: str | None = None
    status: str | None = None

    def given(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def digest(self, window_params: Sequence[str | None]) -> str:
        """Ties a cursor to the filters (and window parameters) of the walk it began."""
        text = msgspec.json.encode([sorted(self.given().items()), list(window_params)])
        return hashlib.sha256(text).hexdigest()[:16]


@dataclass(frozen=True)
class Cursor:
    ts_ms: int  # position: the last row returned
    event_id: str
    from_ms: int  # the walk's window, fixed by its first page
    to_ms: int
    digest: str

    def encode(self) -> str:
        body = msgspec.json.encode(
            [CURSOR_VERSION, self.ts_ms, self.event_id, self.from_ms, self.to_ms, self.digest]
        )
        return base64.urlsafe_b64encode(body).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str, digest: str) -> Cursor:
        """The cursor `text`, checked against this request's filters; 400 otherwise."""
        invalid = ApiError(400, "cursor: not a cursor this endpoint returned")
        if len(text) > MAX_CURSOR_CHARS:
            raise invalid
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            fields = msgspec.json.decode(raw, type=tuple[int, int, str, int, int, str])
        except (binascii.Error, ValueError, msgspec.DecodeError):
            raise invalid from None
        version, ts_ms, event_id, from_ms, to_ms, stored_digest = fields
        if version != CURSOR_VERSION or not from_ms <= ts_ms < to_ms or not event_id:
            raise invalid
        if to_ms - from_ms > MAX_SPAN // timedelta(milliseconds=1):
            raise invalid
        if stored_digest != digest:
            raise ApiError(
                400, "cursor: was issued for other filters; repeat the first page's filters"
            )
        return cls(ts_ms, event_id, from_ms, to_ms, stored_digest)


def check_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"limit: must be between 1 and {MAX_LIMIT}")
    return limit


def check_status(status: str | None) -> str | None:
    if status is not None and status not in STATUSES:
        raise ApiError(400, "status: must be ok or error")
    return status


def to_ms(t: datetime) -> int:
    return int((t - _EPOCH) // timedelta(milliseconds=1))


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def rfc3339_ms(ms: int) -> str:
    t = from_ms(ms)
    return f"{t:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _first_step(start: datetime, end: datetime) -> datetime:
    """Where the first step back from `end` starts: the start of `end`'s day (the whole
    day before when `end` is midnight), not before `start`."""
    lo = floor_day(end)
    if lo == end:
        lo = end - timedelta(days=1)
    return max(lo, start)


def _next_step(start: datetime, end: datetime, lo: datetime, found: int, wanted: int) -> datetime:
    """Where the next step starts, the last one having ended at `lo` with `found` of
    `wanted` rows in [lo, end): twice the span the rows seen so far say the missing ones
    need (at least doubling what was read; 8x when nothing was found), in whole days
    (the sort key's first column), not before `start`."""
    covered = end - lo
    span = max(covered, covered * (2 * (wanted - found) / found)) if found else covered * 8
    days = -(-span // timedelta(days=1))  # ceil
    return max(floor_day(lo) - timedelta(days=days), start)


def _page_sql(filters: Filters, after: bool, time_range: str = _STEP_RANGE) -> str:
    clauses = [time_range]
    clauses += [_FILTER_SQL[name] for name in filters.given()]
    if after:
        clauses.append(_AFTER_CURSOR)
    return _PAGE.format(columns=_COLUMNS, where=" AND ".join(clauses))


def _step_rows(
    client: Client,
    sql: str,
    start: datetime,
    end: datetime,
    wanted: int,
    params: dict[str, Any],
) -> list[Sequence[Any]]:
    """Up to `wanted` rows of [start, end), newest first, read in steps back from `end`."""
    rows: list[Sequence[Any]] = []
    lo, hi = _first_step(start, end), end
    while True:
        last_day = (hi - timedelta(milliseconds=1)).date()
        params.update(
            lo=to_ms(lo), hi=to_ms(hi), lo_day=lo.date(), hi_day=last_day, n=wanted - len(rows)
        )
        rows.extend(client.query(sql, parameters=params).result_rows)
        if len(rows) >= wanted or lo <= start:
            return rows
        lo, hi = _next_step(start, end, lo, len(rows), wanted), lo


def _tenant_rows(
    client: Client,
    filters: Filters,
    start: datetime,
    end: datetime,
    wanted: int,
    params: dict[str, Any],
    after: bool,
    kept: HoursCache | None,
) -> list[Sequence[Any]]:
    """Up to `wanted` rows of [start, end), newest first, read by the tenant's hours.

    The counts of the closed hours [start's hour, end's hour) are kept in `kept` (proved
    current like the figures' whole hours) when given; the hour holding `end` is still
    filling and is always read first, its count unknown."""
    where = " AND ".join(_FILTER_SQL[name] for name in filters.given())
    h_lo, h_now = floor_hour(start), floor_hour(end)
    closed: list[Sequence[Any]] = []
    if h_lo < h_now:
        sql_hours = _TENANT_HOURS.format(where=where)
        hour_params = {**filters.given(), "h_lo": h_lo, "h_hi": h_now}

        def read(ch: Client) -> list[Sequence[Any]]:
            return list(ch.query(sql_hours, parameters=hour_params).result_rows)

        key = ("tenant hours", sql_hours, repr(sorted(hour_params.items())))
        closed = kept.kept(client, key, h_now, read) if kept is not None else read(client)
    hours = ([(h_now, 0)] if end > h_now else []) + closed
    sql = _page_sql(filters, after, _HOURS_RANGE)
    params.update(lo=to_ms(start), hi=to_ms(end))
    rows: list[Sequence[Any]] = []
    i = 0
    while i < len(hours) and len(rows) < wanted:
        # The newest hours not read yet whose events cover what is missing.
        need, chosen = wanted - len(rows), []
        while i < len(hours) and need > 0:
            chosen.append(hours[i][0])
            need -= int(hours[i][1])
            i += 1
        params.update(hours=chosen, days=sorted({h.date() for h in chosen}), n=wanted - len(rows))
        rows.extend(client.query(sql, parameters=params).result_rows)
    return rows


def _optional(value: Any) -> Any:
    """Optional fields are stored as '' or 0 when absent; the API shows them as null."""
    return value or None


_FALLBACK_FIELDS = ("provider", "model", "region", "latency_ms", "error_type", "http_status")


def _fallback(attempt: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    # clickhouse-connect reads a named Tuple as a dict (a tuple in some formats).
    if isinstance(attempt, Mapping):
        attempt = [attempt[name] for name in _FALLBACK_FIELDS]
    provider, model, region, latency_ms, error_type, http_status = attempt
    return {
        "provider": provider,
        "model": _optional(model),
        "region": _optional(region),
        "latency_ms": latency_ms,
        "error_type": _optional(error_type),
        "http_status": _optional(http_status),
    }


def _event(row: Sequence[Any]) -> dict[str, Any]:
    return {
        "event_id": row[0],
        "timestamp": rfc3339_ms(row[1]),
        "tenant_id": row[2],
        "project_id": row[3],
        "api_key_id": _optional(row[4]),
        "provider": row[5],
        "model": row[6],
        "region": row[7],
        "status": row[8],
        "http_status": _optional(row[9]),
        "error_type": _optional(row[10]),
        "queries": row[11],
        "documents": row[12],
        "input_tokens": row[13],
        "output_tokens": row[14],
        "latency_ms": row[15],
        "fallbacks": [_fallback(a) for a in row[16]],
    }


@dataclass(frozen=True)
class Page:
    events: list[dict[str, Any]]
    next_cursor: str | None


def read_page(
    client: Client,
    filters: Filters,
    window: Window,
    limit: int,
    digest: str,
    after: Cursor | None = None,
    kept: HoursCache | None = None,
) -> Page:
    """Up to `limit` events of `window` matching `filters`, newest first, after `after`."""
    start, end = window.start, window.end
    params: dict[str, Any] = dict(filters.given())
    if after is not None:
        params["after_ts"] = after.ts_ms
        params["after_id"] = after.event_id
        # The cursor's row is inside the window: nothing newer than it is read again.
        end = min(end, from_ms(after.ts_ms + 1))
    wanted = limit + 1  # one more than a page: is there a next one?
    if filters.tenant_id is not None:
        rows = _tenant_rows(client, filters, start, end, wanted, params, after is not None, kept)
    else:
        rows = _step_rows(client, _page_sql(filters, after is not None), start, end, wanted, params)
    events = [_event(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = Cursor(
            last[1], last[0], to_ms(window.start), to_ms(window.end), digest
        ).encode()
    return Page(events, next_cursor)
