"""Budget spend from ClickHouse: the ledger's exact base, and hourly spend for forecasts.

Both read the raw table (`rerank_events`, billable rows only) for the tenants that have
budgets; the table's key (day, tenant_id, ...) keeps each day's read to those tenants'
granules. Rows are grouped by the span in which one price applies (the last price
boundary at or before the row, as the figures do), so each group is priced by exactly
one entry of the book, in Python, by `billing.rating`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal

from clickhouse_connect.driver.client import Client

from billing.budgets.forecast import period_of
from billing.budgets.ledger import PAUSE_SECONDS, PriceKey, Scope, UsageMap, pause
from billing.rating import EXACT, METERS, PriceBook, meter_amount
from metering.analytics.facts import ms

_T64 = "DateTime64(3, 'UTC')"
FAR_FUTURE = datetime(2299, 12, 31, tzinfo=UTC)
TENANTS_PER_QUERY = 2_000


def clickhouse_now(ch: Client) -> datetime:
    """ClickHouse's clock, as `ingested_at DEFAULT now64(3)` reads it at an insert."""
    return _utc(ch.query("SELECT now64(3, 'UTC')").result_rows[0][0])


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _rows(
    ch: Client,
    book: PriceBook,
    tenants: list[str],
    since: datetime,
    until: datetime,
    hourly: bool,
    stored_until: datetime | None = None,
) -> Iterator[tuple[str, str, str, str, datetime, int, int, int]]:
    """(tenant, project, provider, model, span start, input, output, pairs) of billable
    events in [since, until); spans are cut at price boundaries, months (and hours).

    One query per TENANTS_PER_QUERY tenants, read as it goes: a result of every budgeted
    tenant at once (tens of thousands of rows) is parsed, and later freed, in single C
    calls that hold the GIL for tens of ms, and the event loop would wait for them."""
    if not tenants:
        return
    bounds = [since, *book.boundaries(since, FAR_FUTURE)]
    cut = "toStartOfHour(timestamp)" if hourly else "toStartOfMonth(timestamp)"
    sql = (
        f"SELECT tenant_id, project_id, provider, model,"
        f" greatest(toDateTime64({cut}, 3, 'UTC'),"
        f" arrayLast(b -> b <= timestamp, {{bounds:Array({_T64})}})) AS span,"
        " sum(toUInt128(input_tokens)), sum(toUInt128(output_tokens)),"
        " sum(toUInt128(queries) * documents)"
        " FROM rerank_events"
        f" WHERE timestamp >= {{since:{_T64}}} AND timestamp < {{until:{_T64}}}"
        " AND status = 'ok' AND tenant_id IN {tenants:Array(String)}"
        + (f" AND ingested_at <= {{stored_until:{_T64}}}" if stored_until is not None else "")
        + " GROUP BY tenant_id, project_id, provider, model, span"
    )
    params = {
        "bounds": [ms(b) for b in bounds],
        "since": ms(since),
        "until": ms(until),
        "tenants": tenants,
    }
    if stored_until is not None:
        params["stored_until"] = ms(stored_until)
    for start in range(0, len(tenants), TENANTS_PER_QUERY):
        params["tenants"] = tenants[start : start + TENANTS_PER_QUERY]
        result = ch.query(sql, parameters=params).result_rows
        spans: dict[datetime, datetime] = {}  # few distinct values: convert each once
        for n, r in enumerate(result):
            span = spans.get(r[4])
            if span is None:
                span = spans[r[4]] = _utc(r[4])
            yield (r[0], r[1], r[2], r[3], span, int(r[5]), int(r[6]), int(r[7]))
            pause(n)
        del result
        time.sleep(PAUSE_SECONDS)


def _scopes_of(scopes: Iterable[Scope]) -> dict[str, list[Scope]]:
    by_tenant: dict[str, list[Scope]] = {}
    for scope in scopes:
        by_tenant.setdefault(scope[0], []).append(scope)
    return by_tenant


def scope_usage(
    ch: Client,
    book: PriceBook,
    scopes: set[Scope],
    since: datetime,
    stored_until: datetime | None = None,
) -> UsageMap:
    """Billable quantities per (scope, period) and price entry, from `since` on, of the
    rows ClickHouse stored up to `stored_until` (its own clock: `ingested_at`)."""
    by_tenant = _scopes_of(scopes)
    out: UsageMap = {}
    rows = _rows(
        ch, book, sorted(by_tenant), since, FAR_FUTURE, hourly=False, stored_until=stored_until
    )
    # (provider, model, span) -> (price key, period): a handful of values for all rows
    priced: dict[tuple[str, str, datetime], tuple[PriceKey, str]] = {}
    for tenant, project, provider, model, span, i, o, p in rows:
        found = priced.get((provider, model, span))
        if found is None:
            entry = book.price_at(provider, model, span)
            price_key: PriceKey = entry.id if entry is not None else ("unpriced", provider, model)
            found = priced[(provider, model, span)] = (price_key, period_of(span))
        key, period = found
        for scope in by_tenant[tenant]:
            if scope[1] is None or scope[1] == project:
                sums = out.setdefault((scope, period), {}).setdefault(key, [0, 0, 0])
                sums[0] += i
                sums[1] += o
                sums[2] += p
    return out


def hourly_spend(
    ch: Client, book: PriceBook, scopes: set[Scope], since: datetime, until: datetime
) -> dict[Scope, dict[datetime, Decimal]]:
    """Spend per UTC hour of each scope in [since, until) (for the forecast)."""
    by_tenant = _scopes_of(scopes)
    out: dict[Scope, dict[datetime, Decimal]] = {s: {} for s in scopes}
    rows = _rows(ch, book, sorted(by_tenant), since, until, hourly=True)
    for tenant, project, provider, model, span, i, o, p in rows:
        entry = book.price_at(provider, model, span)
        if entry is None:
            continue  # unpriced usage has no spend to forecast
        cost = Decimal(0)
        for quantity, meter in zip((i, o, p), METERS, strict=True):
            if quantity:
                cost = EXACT.add(cost, meter_amount(quantity, entry.unit_price(meter), meter))
        hour = span.replace(minute=0, second=0, microsecond=0)
        for scope in by_tenant[tenant]:
            if scope[1] is None or scope[1] == project:
                series = out[scope]
                series[hour] = EXACT.add(series.get(hour, Decimal(0)), cost)
    return out
