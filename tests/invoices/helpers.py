"""Workloads and an independent brute-force invoice computation for invoice tests.

The brute force works event by event over the events the test generated: the price of an
event is looked up by hand in the listed entries (latest effective_from <= timestamp),
quantities are summed per line key, and each line is rounded half-up to the cent with
Decimal. It shares no code with billing.invoices or billing.rating.
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from fastapi.testclient import TestClient

from tests.ingest.helpers import event

PROVIDERS = ("llmapi", "cohere", "azure", "bedrock")
MODELS = ("rerank-4-pro", "rerank-3", "text-embedding-3-large")
UNIT = {
    "input_tokens": Decimal(10**6),
    "output_tokens": Decimal(10**6),
    "doc_query_pairs": Decimal(10**3),
}
PRICE_FIELD = {
    "input_tokens": "input_per_1m_tokens",
    "output_tokens": "output_per_1m_tokens",
    "doc_query_pairs": "per_1k_doc_query_pairs",
}


def iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ts(e: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))


def workload(
    prefix: str,
    start: datetime,
    end: datetime,
    n: int,
    tenants: list[str],
    seed: int = 1,
    models: tuple[str, ...] = MODELS,
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    span = (end - start).total_seconds()
    out = []
    for i in range(n):
        t = start + timedelta(seconds=rng.uniform(0, span))
        t = t.replace(microsecond=t.microsecond // 1000 * 1000)
        out.append(
            event(
                f"{prefix}-{i}",
                timestamp=iso(t),
                tenant_id=rng.choice(tenants),
                project_id=f"proj-{rng.randint(1, 2)}",
                provider=rng.choice(PROVIDERS),
                model=rng.choice(models),
                status="error" if rng.random() < 0.1 else "ok",
                documents=rng.randint(0, 300),
                queries=rng.choice([1, 1, 2]),
                input_tokens=rng.randint(0, 90_000),
                output_tokens=rng.choice([0, 0, rng.randint(0, 50)]),
                latency_ms=100.0,
            )
        )
    return out


def post_events(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> None:
    for i in range(0, len(events), 500):
        r = client.post("/v1/events", json={"events": events[i : i + 500]}, headers=headers)
        assert r.status_code == 202, r.text
        assert not r.json()["rejected"], r.text


def _price(
    prices: list[dict[str, Any]], provider: str, model: str, at: datetime
) -> dict[str, Any] | None:
    best = None
    for p in prices:
        start = datetime.fromisoformat(p["effective_from"].replace("Z", "+00:00"))
        same = p["provider"] == provider and p["model"] == model
        if same and start <= at and (best is None or start > best[0]):
            best = (start, p)
    return None if best is None else best[1]


def brute_quantities(
    events: list[dict[str, Any]], prices: list[dict[str, Any]], start: datetime, end: datetime
) -> dict[str, dict[tuple[str, str, str, str, str | None], int]]:
    """tenant -> (project, provider, model, meter, price id) -> quantity."""
    out: dict[str, dict[tuple[str, str, str, str, str | None], int]] = defaultdict(
        lambda: defaultdict(int)
    )
    for e in events:
        if e["status"] != "ok" or not start <= ts(e) < end:
            continue
        p = _price(prices, e["provider"], e["model"], ts(e))
        pid = p["id"] if p else None
        for meter, q in (
            ("input_tokens", e["input_tokens"]),
            ("output_tokens", e.get("output_tokens", 0)),
            ("doc_query_pairs", e.get("queries", 1) * e["documents"]),
        ):
            if q:
                out[e["tenant_id"]][(e["project_id"], e["provider"], e["model"], meter, pid)] += q
    return out


def brute_lines(
    quantities: dict[tuple[str, str, str, str, str | None], int], prices: list[dict[str, Any]]
) -> tuple[dict[tuple[str, str, str, str, str | None], tuple[int, str]], Decimal]:
    """line key -> (quantity, amount as cents text), and the total."""
    by_id = {p["id"]: p for p in prices}
    lines = {}
    total = Decimal(0)
    for key, q in quantities.items():
        if q == 0:
            continue
        pid, meter = key[4], key[3]
        if pid is None:
            amount = Decimal("0.00")
        else:
            unit_price = Decimal(by_id[pid][PRICE_FIELD[meter]])
            amount = (Decimal(q) * unit_price / UNIT[meter]).quantize(
                Decimal("0.01"), rounding=ROUND_HALF_UP
            )
        lines[key] = (q, str(amount))
        total += amount
    return lines, total


def got_lines(
    invoice: dict[str, Any], usage_period: str
) -> dict[tuple[str, str, str, str, str | None], tuple[int, str]]:
    out = {}
    for ln in invoice["lines"]:
        if ln["usage_period"] != usage_period:
            continue
        key = (ln["project_id"], ln["provider"], ln["model"], ln["meter"], ln["price_id"])
        assert key not in out, key
        out[key] = (ln["quantity"], ln["amount_usd"])
    return out
