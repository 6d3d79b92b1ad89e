"""`metering invoices verify --period YYYY-MM`: the audit.

Recomputes the month from the raw table `rerank_events` (projections switched off) and
the price book, by a path independent of the one that built the invoices: ClickHouse
assigns each event its price entry itself (`multiIf` over every entry's interval of
the month), and Python only sums. Then, per tenant:

- every line key's quantity billed for the month (on the month's invoice and on later
  invoices' late lines, every status) must equal the raw total now: more is billed twice,
  less is not billed yet (late usage waits for the tenant's next invoice: run the next
  month, then verify again);
- every line of those invoices must carry its entry's unit price, the unit of its meter,
  and the amount quantity / unit size x price rounded half-up to the cent;
- every invoice of the month must total the sum of its lines.

Each difference is one printed line; the command exits 1 if there is any.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime

from clickhouse_connect.driver.client import Client
from sqlalchemy.orm import Session

from billing.invoices import repository as repo
from billing.invoices.builder import line_amount
from billing.invoices.periods import Period
from billing.rating import UNIT_NAME, Meter, PriceBook, PriceEntry
from metering.analytics.facts import ms

_T64 = "DateTime64(3, 'UTC')"
RAW_ONLY = {"optimize_use_projections": 0}
# (tenant, project, provider, model, meter, price entry id or None)
QuantityKey = tuple[str, str, str, str, str, str | None]


def _intervals(book: PriceBook, period: Period) -> Iterator[tuple[PriceEntry, datetime, datetime]]:
    by_key: dict[tuple[str, str], list[PriceEntry]] = defaultdict(list)
    for entry in book.entries:
        by_key[(entry.provider, entry.model)].append(entry)
    for entries in by_key.values():
        entries.sort(key=lambda e: e.effective_from)
        for i, entry in enumerate(entries):
            end = entries[i + 1].effective_from if i + 1 < len(entries) else period.end
            a, b = max(entry.effective_from, period.start), min(end, period.end)
            if a < b:
                yield entry, a, b


def raw_quantities(ch: Client, book: PriceBook, period: Period) -> dict[QuantityKey, int]:
    params: dict[str, object] = {"start": ms(period.start), "end": ms(period.end)}
    cases = []
    for i, (entry, a, b) in enumerate(_intervals(book, period)):
        params.update({f"p{i}": entry.provider, f"m{i}": entry.model, f"id{i}": entry.id})
        params.update({f"a{i}": ms(a), f"b{i}": ms(b)})
        cases.append(
            f"provider = {{p{i}:String}} AND model = {{m{i}:String}}"
            f" AND timestamp >= {{a{i}:{_T64}}} AND timestamp < {{b{i}:{_T64}}}, {{id{i}:String}}"
        )
    entry_expr = f"multiIf({', '.join(cases)}, '')" if cases else "''"
    sql = (
        f"SELECT tenant_id, project_id, provider, model, {entry_expr} AS entry,"
        " sum(toUInt128(input_tokens)), sum(toUInt128(output_tokens)),"
        " sum(toUInt128(queries) * documents)"
        " FROM rerank_events"
        f" WHERE timestamp >= {{start:{_T64}}} AND timestamp < {{end:{_T64}}} AND status = 'ok'"
        " GROUP BY tenant_id, project_id, provider, model, entry"
    )
    out: dict[QuantityKey, int] = {}
    with ch.query_rows_stream(sql, parameters=params, settings=RAW_ONLY) as rows:
        for tenant, project, provider, model, entry, n_in, n_out, n_pairs in rows:
            sums = (("input_tokens", n_in), ("output_tokens", n_out), ("doc_query_pairs", n_pairs))
            for meter, q in sums:
                if q:
                    out[(tenant, project, provider, model, meter, entry or None)] = int(q)
    return out


def verify_period(session: Session, ch: Client, book: PriceBook, period: Period) -> list[str]:
    """Every difference between the month's invoices and the raw events, as text."""
    name = str(period)
    diffs: list[str] = []
    raw = raw_quantities(ch, book, period)
    prices = {e.id: e for e in book.entries}
    billed: dict[QuantityKey, int] = defaultdict(int)
    where: dict[QuantityKey, set[str]] = defaultdict(set)
    invoices = repo.invoices_with_usage_of(session, name)
    lines = repo.lines_of(session, [i.id for i in invoices])
    for inv in sorted(invoices, key=lambda i: (i.tenant_id, i.period)):
        label = f"invoice {inv.id} ({inv.tenant_id} {inv.period}, {inv.status})"
        total = sum((ln.amount_usd for ln in lines[inv.id]), start=0)
        if inv.period == name and (inv.total_usd != total or inv.subtotal_usd != total):
            diffs.append(f"{label}: total {inv.total_usd}, sum of its lines {total}")
        for ln in lines[inv.id]:
            if ln.usage_period != name:
                continue
            key = (inv.tenant_id, ln.project_id, ln.provider, ln.model, ln.meter, ln.price_id)
            billed[key] += ln.quantity
            where[key].add(inv.id)
            what = f"{label} line {ln.position} ({ln.project_id} {ln.provider}/{ln.model}"
            what += f" {ln.meter})"
            meter: Meter = ln.meter  # type: ignore[assignment]
            if ln.unit != UNIT_NAME.get(meter):
                diffs.append(f"{what}: unit {ln.unit!r}, should be {UNIT_NAME.get(meter)!r}")
            if ln.price_id is None:
                if ln.unit_price_usd is not None or ln.amount_usd != 0:
                    diffs.append(f"{what}: unpriced line with a price or an amount")
                continue
            entry = prices.get(ln.price_id)
            if entry is None:
                diffs.append(f"{what}: price entry {ln.price_id} is not in the price book")
                continue
            if ln.unit_price_usd != entry.unit_price(meter):
                diffs.append(
                    f"{what}: unit price {ln.unit_price_usd}, price entry {entry.id} says"
                    f" {entry.unit_price(meter)}"
                )
            want = line_amount(ln.quantity, entry.unit_price(meter), meter)
            if ln.amount_usd != want:
                diffs.append(f"{what}: amount {ln.amount_usd}, should be {want}")
    for key in sorted(set(raw) | set(billed), key=lambda k: tuple(str(x) for x in k)):
        have, want_q = billed.get(key, 0), raw.get(key, 0)
        if have == want_q:
            continue
        tenant, project, provider, model, meter_name, price_id = key
        what = f"{tenant} {name} {project} {provider}/{model} {meter_name}"
        what += f" price {price_id or 'none'}"
        if have > want_q:
            diffs.append(
                f"{what}: billed {have} ({', '.join(sorted(where[key]))}), raw events {want_q}:"
                f" {have - want_q} billed more than used"
            )
        else:
            diffs.append(
                f"{what}: raw events {want_q}, billed {have}: {want_q - have} not billed yet"
            )
    return diffs
