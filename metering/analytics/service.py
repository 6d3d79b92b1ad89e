"""The figures: stats, usage and the providers table, from facts and the price book.

Money goes through `billing.rating` only, the same functions budgets and invoices use.
Usage with no price entry is reported as unpriced (its cost is null and it is listed),
never as zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client

from billing.rating import EXACT, PriceBook, Usage, money, rate
from metering.analytics.facts import Fact, active_accounts, facts, probe_counts
from metering.analytics.hours_cache import HoursCache, Runner, sequential
from metering.analytics.providers import ProviderFigures, provider_figures, rows_sorted
from metering.analytics.window import Window, floor_day, floor_hour


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pct(ok: int, n: int) -> float | None:
    return 100.0 * ok / n if n else None


def _usage(fact: Fact, key: Any) -> Usage[Any]:
    return Usage(
        key, fact.provider, fact.model, fact.span, fact.input_tokens, fact.output_tokens, fact.pairs
    )


class _Unpriced:
    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], list[int]] = {}

    def add(self, u: Usage[Any]) -> None:
        sums = self.by_key.setdefault((u.provider, u.model), [0, 0, 0])
        sums[0] += u.input_tokens
        sums[1] += u.output_tokens
        sums[2] += u.doc_query_pairs

    def listed(self) -> list[dict[str, Any]]:
        return [
            {
                "provider": p,
                "model": m,
                "input_tokens": s[0],
                "output_tokens": s[1],
                "doc_query_pairs": s[2],
            }
            for (p, m), s in sorted(self.by_key.items())
            if any(s)
        ]


def stats_facts(ch: Client, book: PriceBook, window: Window, tenant_id: str | None) -> list[Fact]:
    filters = {"tenant_id": tenant_id} if tenant_id else {}
    boundaries = book.boundaries(floor_hour(window.start), window.end)
    return facts(ch, window, boundaries, filters=filters, bucket=None)


def stats(
    ch: Client,
    book: PriceBook,
    window: Window,
    tenant_id: str | None,
    hours: HoursCache | None = None,
) -> dict[str, Any]:
    """The figures with one client, query after query (the route runs them at once);
    the platform's whole hours from `hours` when given."""
    if tenant_id is None and hours is not None:
        figures = hours.platform(sequential(ch), book, window)
        return assemble_stats(book, window, None, figures.facts, figures.accounts, figures.probes)
    accounts = None if tenant_id else active_accounts(ch, window)
    return assemble_stats(
        book,
        window,
        tenant_id,
        stats_facts(ch, book, window, tenant_id),
        accounts,
        probe_counts(ch, window),
    )


def assemble_stats(
    book: PriceBook,
    window: Window,
    tenant_id: str | None,
    rows: list[Fact],
    accounts: int | None,
    probes: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    requests = errors = documents = pairs = input_tokens = output_tokens = 0
    ok_usage = []
    for f in rows:
        requests += f.requests
        if f.status == "error":
            errors += f.requests
            continue
        documents += f.documents
        pairs += f.pairs
        input_tokens += f.input_tokens
        output_tokens += f.output_tokens
        ok_usage.append(_usage(f, None))
    spend = Decimal(0)
    unpriced = _Unpriced()
    for rated in rate(ok_usage, book):
        cost = rated.cost
        if cost is None:
            unpriced.add(rated.usage)
        else:
            spend = EXACT.add(spend, cost)
    if accounts is None:  # one tenant: active or not
        accounts = 1 if requests else 0
    ok_probes = sum(ok for ok, _ in probes.values())
    all_probes = sum(n for _, n in probes.values())
    return {
        "from": _iso(window.start),
        "to": _iso(window.end),
        "tenant_id": tenant_id,
        "documents_reranked": documents,
        "requests": requests,
        "active_accounts": accounts,
        "avg_uptime_pct": _pct(ok_probes, all_probes),
        "doc_query_pairs": pairs,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "errors": errors,
        "spend_usd": money(spend),
        "unpriced_usage": unpriced.listed(),
    }


def bucket_of(t: datetime, granularity: str) -> datetime:
    if granularity == "hour":
        return floor_hour(t)
    if granularity == "day":
        return floor_day(t)
    return floor_day(t).replace(day=1)


def usage(
    ch: Client | Runner,
    book: PriceBook,
    window: Window,
    *,
    granularity: str,
    group_by: Sequence[str],
    filters: dict[str, str],
    hours: HoursCache | None = None,
) -> dict[str, Any]:
    """Usage per bucket and group, read with one client (query after query) or a Runner;
    whole hours from `hours` when given."""
    boundaries = book.boundaries(floor_hour(window.start), window.end)
    run = sequential(ch) if isinstance(ch, Client) else ch
    if hours is not None:
        rows = hours.facts(
            run, window, boundaries, filters=filters, group=group_by, bucket=granularity
        )
    else:
        rows = run(
            [
                lambda c: facts(
                    c, window, boundaries, filters=filters, group=group_by, bucket=granularity
                )
            ]
        )[0]
    extra = [k for k in group_by if k in ("tenant_id", "project_id")]
    series: dict[tuple[Any, ...], dict[str, Any]] = {}
    ok_usage: list[Usage[tuple[Any, ...]]] = []
    for f in rows:
        values = dict(zip(extra, f.keys, strict=True))
        values["provider"], values["model"] = f.provider, f.model
        bucket = bucket_of(f.span, granularity)
        key = (bucket, *(values[k] for k in group_by))
        row = series.get(key)
        if row is None:
            row = series[key] = {
                "bucket": _iso(bucket),
                **{k: values[k] for k in group_by},
                "requests": 0,
                "errors": 0,
                "documents": 0,
                "doc_query_pairs": 0,
                "input_tokens": 0,
                "output_tokens": 0,
                "cost_usd": Decimal(0),
                "unpriced": False,
            }
        row["requests"] += f.requests
        if f.status == "error":
            row["errors"] += f.requests
            continue
        row["documents"] += f.documents
        row["doc_query_pairs"] += f.pairs
        row["input_tokens"] += f.input_tokens
        row["output_tokens"] += f.output_tokens
        ok_usage.append(_usage(f, key))
    for rated in rate(ok_usage, book):
        row = series[rated.usage.key]
        cost = rated.cost
        if cost is None:
            if rated.usage.input_tokens or rated.usage.output_tokens or rated.usage.doc_query_pairs:
                row["unpriced"] = True
        else:
            row["cost_usd"] = EXACT.add(row["cost_usd"], cost)
    out = []
    for key in sorted(series, key=lambda k: tuple(str(x) for x in k)):
        row = series[key]
        row["cost_usd"] = None if row["unpriced"] else money(row["cost_usd"])
        out.append(row)
    return {
        "from": _iso(window.start),
        "to": _iso(window.end),
        "granularity": granularity,
        "group_by": list(group_by),
        "series": out,
    }


def providers(
    ch: Client, book: PriceBook, window: Window, tenant_id: str | None, now: datetime
) -> dict[str, Any]:
    figures = provider_figures(ch, window, tenant_id)
    probes = probe_counts(ch, window)
    listed = []
    for name in probes:
        figures.setdefault(name, ProviderFigures(name))
    for f in rows_sorted(figures):
        ok, n = probes.get(f.provider, (0, 0))
        q: list[float | None] = list(f.quantiles) or [None, None, None]
        listed.append(
            {
                "provider": f.provider,
                "requests": f.requests,
                "errors": f.errors,
                "error_rate": (f.errors / f.requests) if f.requests else None,
                "latency_ms": {
                    "avg": (f.latency_sum / f.ok_requests) if f.ok_requests else None,
                    "p50": q[0],
                    "p95": q[1],
                    "p99": q[2],
                },
                "peak_rps": f.peak_rps,
                "uptime_pct": _pct(ok, n),
                "prices": [price_out(p) for p in book.for_provider(f.provider, now)],
            }
        )
    return {"from": _iso(window.start), "to": _iso(window.end), "providers": listed}


def price_out(p: Any) -> dict[str, Any]:
    return {
        "id": p.id,
        "provider": p.provider,
        "model": p.model,
        "effective_from": _iso(p.effective_from),
        "currency": p.currency,
        "input_per_1m_tokens": money(p.input_per_1m_tokens),
        "output_per_1m_tokens": money(p.output_per_1m_tokens),
        "per_1k_doc_query_pairs": money(p.per_1k_doc_query_pairs),
    }
