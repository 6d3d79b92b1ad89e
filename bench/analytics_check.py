"""Figure checks for bench/analytics.py: an endpoint's answer next to the raw query's.

Spend is recomputed here from the raw query's billable sums and the price book the
server lists (`GET /v1/prices`), in plain Decimal arithmetic: independent of
`billing.rating`, which the endpoints use. Each check is (figure, equal?, detail).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal, localcontext
from typing import Any

Check = tuple[str, bool, str]
_MILLION = Decimal(1_000_000)
_THOUSAND = Decimal(1_000)


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def price_bounds_ms(prices: list[dict[str, Any]]) -> list[int]:
    """Every instant at which some price entry takes effect (ms since the epoch)."""
    return sorted({_ms(p["effective_from"]) for p in prices})


def _entry(prices: list[dict[str, Any]], provider: str, model: str, at_ms: int) -> Any:
    found = [
        p
        for p in prices
        if p["provider"] == provider and p["model"] == model and _ms(p["effective_from"]) <= at_ms
    ]
    return max(found, key=lambda p: _ms(p["effective_from"])) if found else None


def cost(
    prices: list[dict[str, Any]], groups: Iterable[tuple[str, str, int, int, int, int]]
) -> tuple[Decimal, bool]:
    """Σ cost of (provider, model, since_ms, input, output, pairs) groups; any unpriced."""
    total = Decimal(0)
    unpriced = False
    with localcontext() as ctx:
        ctx.prec = 80
        for provider, model, since, tokens_in, tokens_out, pairs in groups:
            entry = _entry(prices, provider, model, since)
            if entry is None:
                unpriced = unpriced or bool(tokens_in or tokens_out or pairs)
                continue
            total += (
                tokens_in * Decimal(entry["input_per_1m_tokens"]) / _MILLION
                + tokens_out * Decimal(entry["output_per_1m_tokens"]) / _MILLION
                + pairs * Decimal(entry["per_1k_doc_query_pairs"]) / _THOUSAND
            )
    return total, unpriced


def _same(name: str, got: Any, want: Any) -> Check:
    detail = f"{got:,}" if isinstance(got, int) and got == want else f"endpoint {got}, raw {want}"
    return name, got == want, detail


def check_stats(
    body: dict[str, Any], raw: dict[str, Any], prices: list[dict[str, Any]]
) -> list[Check]:
    fig = raw["figures"]
    checks = [_same(name, body.get(name), fig[name]) for name in (
        "requests", "errors", "documents_reranked", "doc_query_pairs", "input_tokens",
        "output_tokens", "active_accounts")]  # fmt: skip
    uptime = 100.0 * fig["ok_probes"] / fig["probes"] if fig["probes"] else None
    checks.append(_same("avg_uptime_pct", body.get("avg_uptime_pct"), uptime))
    spend, unpriced = cost(prices, [tuple(g) for g in raw["spend_groups"]])
    got = Decimal(body["spend_usd"])
    checks.append(("spend_usd", got == spend, f"endpoint {body['spend_usd']}, raw {spend}"))
    listed = bool(body.get("unpriced_usage"))
    checks.append(
        ("unpriced usage listed", listed == unpriced, f"endpoint {listed}, raw {unpriced}")
    )
    return checks


def check_usage(
    body: dict[str, Any], raw: dict[str, Any], prices: list[dict[str, Any]]
) -> list[Check]:
    buckets: dict[int, dict[str, Any]] = {}
    for bucket_s, provider, model, since, n, err, docs, pairs, t_in, t_out in raw["rows"]:
        acc = buckets.setdefault(
            bucket_s * 1000,
            {"requests": 0, "errors": 0, "documents": 0, "doc_query_pairs": 0,
             "input_tokens": 0, "output_tokens": 0, "groups": []},
        )  # fmt: skip
        acc["requests"] += n
        acc["errors"] += err
        acc["documents"] += docs
        acc["doc_query_pairs"] += pairs
        acc["input_tokens"] += t_in
        acc["output_tokens"] += t_out
        acc["groups"].append((provider, model, since, t_in, t_out, pairs))
    series = {_ms(row["bucket"]): row for row in body["series"]}
    names = ("requests", "errors", "documents", "doc_query_pairs", "input_tokens", "output_tokens")
    checks = [_same("buckets", len(series), len(buckets))]
    bad = [day for day in sorted(buckets) if day not in series]
    for day, want in sorted(buckets.items()):
        got = series.get(day)
        if got is None:
            continue
        spend, unpriced = cost(prices, want["groups"])
        got_cost = got.get("cost_usd")
        cost_ok = (
            (got_cost is None)
            if unpriced
            else (got_cost is not None and Decimal(got_cost) == spend)
        )
        if not cost_ok or any(got.get(n) != want[n] for n in names):
            bad.append(day)
    total = sum(acc["requests"] for acc in buckets.values())
    checks.append(
        ("every bucket's counts, sums and cost_usd", not bad,
         f"{len(buckets)} days, {total:,} requests" + (f"; differ: {bad[:5]}" if bad else ""))
    )  # fmt: skip
    return checks


def check_providers(body: dict[str, Any], raw: dict[str, Any]) -> list[Check]:
    got = {p["provider"]: p for p in body["providers"]}
    checks: list[Check] = [
        _same("providers", sorted(got), sorted(r["provider"] for r in raw["rows"]))
    ]
    for r in raw["rows"]:
        g = got.get(r["provider"])
        if g is None:
            continue
        exact = {
            "requests": (g["requests"], r["requests"]),
            "errors": (g["errors"], r["errors"]),
            "peak_rps": (g["peak_rps"], r["peak_rps"]),
            "uptime_pct": (
                g["uptime_pct"],
                100.0 * r["ok_probes"] / r["probes"] if r["probes"] else None,
            ),
        }
        diff = [f"{k} {a} vs {b}" for k, (a, b) in exact.items() if a != b]
        avg = r["latency_sum"] / r["ok_requests"] if r["ok_requests"] else None
        lat = g["latency_ms"]
        near = [("avg", lat["avg"], avg, 1e-9)] + [
            (name, lat[name], q, 0.01)
            for name, q in zip(("p50", "p95", "p99"), r["quantiles"], strict=True)
        ]
        for name, a, b, rel in near:
            if a is None or b is None or abs(a - b) > rel * abs(b):
                diff.append(f"latency {name} {a} vs {b}")
        detail = "; ".join(diff) or (
            f"requests {r['requests']:,}, errors {r['errors']:,}, peak_rps {r['peak_rps']},"
            f" p50 {lat['p50']:.1f} ms vs raw {r['quantiles'][0]:.1f}"
        )
        checks.append((r["provider"], not diff, detail))
    return checks


def check_requests(body: dict[str, Any], raw: dict[str, Any]) -> list[Check]:
    got = [e["event_id"] for e in body["requests"]]
    want = raw["event_ids"]
    return [("first page event ids", got == want, f"{len(got)} endpoint, {len(want)} raw")]
