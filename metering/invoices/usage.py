"""Billable usage for invoices, from the raw table `rerank_events`.

Invoices are per tenant and project, which the rollup projections do not keep, so every
query here reads raw rows (the table's key, day then tenant, keeps a tenant's read small).
Usage is summed per (tenant, project, provider, model, span), where a span starts at the
window's start or at the last price boundary before the row, so that one price entry
covers each span (`billing.rating.PriceBook.boundaries`). Values are bound as parameters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from clickhouse_connect.driver.client import Client

from billing.rating import EXACT, PriceBook, Usage, rate
from metering.analytics.facts import Fact, facts, ms
from metering.analytics.window import Window, floor_hour

_T64 = "DateTime64(3, 'UTC')"
_SUMS = (
    "sum(toUInt128(input_tokens)) AS n_input, sum(toUInt128(output_tokens)) AS n_output,"
    " sum(toUInt128(queries) * documents) AS n_pairs"
)
_USAGE = (
    "SELECT tenant_id, project_id, provider, model, {span} AS span, "
    + _SUMS
    + " FROM rerank_events"
    f" WHERE timestamp >= {{start:{_T64}}} AND timestamp < {{end:{_T64}}} AND status = 'ok'"
    "{tenants} GROUP BY tenant_id, project_id, provider, model, span"
)
_SPAN_CONSTANT = f"{{start:{_T64}}}"
_SPAN_SEARCH = f"arrayLast(b -> b <= timestamp, {{bounds:Array({_T64})}})"
_TENANTS = " AND tenant_id IN {tenants:Array(String)}"
LATE_CANDIDATES = (
    "SELECT DISTINCT tenant_id FROM rerank_events"
    f" WHERE timestamp >= {{start:{_T64}}} AND timestamp < {{end:{_T64}}} AND status = 'ok'"
    f" AND ingested_at >= {{since:{_T64}}}"
)
TENANT_CHUNK = 20_000  # tenants per query when a set of tenants is read

UsageByTenant = dict[str, list[Usage[str]]]


def _chunks(tenants: Iterable[str] | None) -> list[list[str] | None]:
    """The tenants in sorted chunks of TENANT_CHUNK (one query each); [None]: all."""
    if tenants is None:
        return [None]
    ordered = sorted(tenants)
    return [ordered[i : i + TENANT_CHUNK] for i in range(0, len(ordered), TENANT_CHUNK)]


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def usage(
    ch: Client,
    book: PriceBook,
    start: datetime,
    end: datetime,
    tenants: Collection[str] | None = None,
) -> UsageByTenant:
    """Billable usage in [start, end) per tenant: `Usage` rows keyed by project id."""
    boundaries = book.boundaries(start, end)
    sql = _USAGE.replace("{span}", _SPAN_SEARCH if boundaries else _SPAN_CONSTANT)
    params: dict[str, object] = {"start": ms(start), "end": ms(end)}
    if boundaries:
        params["bounds"] = [ms(start)] + [ms(b) for b in boundaries]
    out: UsageByTenant = defaultdict(list)
    for chunk in _chunks(tenants):
        query = sql.replace("{tenants}", "" if chunk is None else _TENANTS)
        if chunk is not None:
            params["tenants"] = chunk
        with ch.query_rows_stream(query, parameters=params) as rows:
            for tenant, project, provider, model, span, n_in, n_out, n_pairs in rows:
                out[tenant].append(
                    Usage(project, provider, model, _utc(span), int(n_in), int(n_out), int(n_pairs))
                )
    return dict(out)


# A month's close: the same sums, with spans cut only where each (provider, model)'s own
# price changes (so each row has one price entry), as UInt64 (a sum beyond it raises),
# the span's start in epoch milliseconds, sorted by tenant, project, provider, model and
# span (the order of an invoice's lines), streamed.
_ROWS = (
    "SELECT tenant_id, project_id, provider, model, toUnixTimestamp64Milli(span),"
    " toUInt64(n_input), toUInt64(n_output), toUInt64(n_pairs) FROM ("
    "SELECT tenant_id, project_id, provider, model, {span} AS span, "
    + _SUMS
    + " FROM rerank_events"
    f" WHERE timestamp >= {{start:{_T64}}} AND timestamp < {{end:{_T64}}} AND status = 'ok'"
    "{tenants} GROUP BY tenant_id, project_id, provider, model, span)"
    " WHERE throwIf(greatest(n_input, n_output, n_pairs) > 18446744073709551615,"
    " 'invoice usage: a sum exceeds UInt64') = 0"
    " ORDER BY tenant_id, project_id, provider, model, span"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

UsageRow = tuple[str, str, str, str, int, int, int, int]


def span_start(ms_since_epoch: int) -> datetime:
    """A usage row's span key (epoch milliseconds) as the instant it stands for."""
    return _EPOCH + timedelta(milliseconds=ms_since_epoch)


def billable_rows(
    ch: Client,
    book: PriceBook,
    start: datetime,
    end: datetime,
    tenants: Collection[str] | None = None,
) -> Iterator[UsageRow]:
    """Billable usage in [start, end) as rows (tenant, project, provider, model, span
    start in epoch ms, input tokens, output tokens, pairs), sorted in that order and
    streamed. A span starts at `start` or where the (provider, model)'s price changes
    (`PriceBook.boundaries_by_model`), so one price entry covers each row's span."""
    params: dict[str, object] = {"start": ms(start), "end": ms(end)}
    cuts = []
    for i, ((provider, model), instants) in enumerate(
        sorted(book.boundaries_by_model(start, end).items())
    ):
        params[f"p{i}"], params[f"m{i}"] = provider, model
        for k, instant in enumerate(instants):
            params[f"b{i}_{k}"] = ms(instant)
            cuts.append(
                f"if(provider = {{p{i}:String}} AND model = {{m{i}:String}}"
                f" AND timestamp >= {{b{i}_{k}:{_T64}}}, {{b{i}_{k}:{_T64}}}, {{start:{_T64}}})"
            )
    span = f"greatest({{start:{_T64}}}, {', '.join(cuts)})" if cuts else f"{{start:{_T64}}}"
    sql = _ROWS.replace("{span}", span)
    for chunk in _chunks(tenants):
        query = sql.replace("{tenants}", "" if chunk is None else _TENANTS)
        if chunk is not None:
            params["tenants"] = chunk
        with ch.query_rows_stream(query, parameters=params) as rows:
            yield from rows


def late_candidates(ch: Client, start: datetime, end: datetime, since: datetime) -> set[str]:
    """Tenants with billable events in [start, end) stored at or after `since`."""
    params = {"start": ms(start), "end": ms(end), "since": ms(since)}
    return {row[0] for row in ch.query(LATE_CANDIDATES, parameters=params).result_rows}


def hourly_spend(
    ch: Client, book: PriceBook, tenant_id: str, start: datetime, end: datetime
) -> tuple[dict[datetime, Decimal], Decimal]:
    """The tenant's exact spend per UTC hour start in [start, end), and its sum."""
    window = Window(start, end)
    boundaries = book.boundaries(floor_hour(start), end)
    rows = facts(ch, window, boundaries, filters={"tenant_id": tenant_id}, bucket="hour")
    usages = [
        Usage(floor_hour(f.span), f.provider, f.model, f.span, *_sums(f))
        for f in rows
        if f.status == "ok"
    ]
    hourly: dict[datetime, Decimal] = defaultdict(Decimal)
    total = Decimal(0)
    for rated in rate(usages, book):
        cost = rated.cost
        if cost is not None:
            hourly[rated.usage.key] = EXACT.add(hourly[rated.usage.key], cost)
            total = EXACT.add(total, cost)
    return dict(hourly), total


def _sums(f: Fact) -> tuple[int, int, int]:
    return f.input_tokens, f.output_tokens, f.pairs


def exact_cost(usages: Mapping[str, list[Usage[str]]], book: PriceBook) -> Decimal:
    total = Decimal(0)
    for rows in usages.values():
        for rated in rate(rows, book):
            cost = rated.cost
            if cost is not None:
                total = EXACT.add(total, cost)
    return total


FORECAST_DAYS = timedelta(days=28)
