"""Every figure equals a brute-force computation over the raw events.

The workload has duplicates (a batch sent twice), late events, errors with fallbacks,
an unpriced model, several tenants and projects, and a price change in the middle of
an hour; the window starts and ends off the hour, so every source (projections for
whole hours and days, raw rows for the edges and the split hour) is exercised.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from billing.rating import PriceBook, PriceEntry, event_cost
from metering.analytics.facts import active_accounts, facts
from metering.analytics.providers import provider_figures
from metering.analytics.window import Window
from metering.services import Services
from tests.ingest.helpers import event, probe

NOW = datetime.now(UTC).replace(microsecond=0)
BASE = NOW.replace(minute=0, second=0) - timedelta(days=2)
CHANGE = BASE + timedelta(hours=5, minutes=17, seconds=3, milliseconds=250)
PROVIDERS = ("llmapi", "cohere", "azure", "bedrock")
MODELS = ("rerank-4-pro", "rerank-3", "mystery-model")


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _workload(seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = []
    for i in range(1500):
        t = BASE + timedelta(seconds=rng.uniform(0, 30 * 3600))
        if i % 100 == 0:
            t = NOW - timedelta(days=rng.choice([10, 45]))  # late; one inside 30d, one not
        status = "error" if rng.random() < 0.1 else "ok"
        fallbacks = [
            {"provider": rng.choice(PROVIDERS), "latency_ms": 12.0, "error_type": "timeout"}
            for _ in range(rng.choice([0, 0, 0, 1, 2]))
        ]
        events.append(
            event(
                f"fig-{i}",
                timestamp=_iso(t.replace(microsecond=t.microsecond // 1000 * 1000)),
                tenant_id=f"acct-{rng.randint(1, 40)}",
                project_id=f"proj-{rng.randint(1, 3)}",
                provider=rng.choice(PROVIDERS),
                model=rng.choices(MODELS, weights=[6, 3, 1])[0],
                status=status,
                documents=rng.randint(0, 300),
                queries=rng.choice([1, 1, 2]),
                input_tokens=rng.randint(0, 90_000),
                output_tokens=rng.randint(0, 50),
                latency_ms=rng.uniform(20, 900),
                fallbacks=fallbacks,
            )
        )
    return events


def _post(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> None:
    for start in range(0, len(events), 500):
        r = client.post("/v1/events", json={"events": events[start : start + 500]}, headers=headers)
        assert r.status_code == 202, r.text


def _ts(e: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))


def _brute(
    events: list[dict[str, Any]], book: PriceBook, start: datetime, end: datetime
) -> dict[str, Any]:
    inside = [e for e in events if start <= _ts(e) < end]
    ok = [e for e in inside if e["status"] == "ok"]
    spend = Decimal(0)
    unpriced = set()
    for e in ok:
        price = book.price_at(e["provider"], e["model"], _ts(e))
        if price is None:
            unpriced.add((e["provider"], e["model"]))
            continue
        spend += event_cost(
            price, e["input_tokens"], e["output_tokens"], e["queries"] * e["documents"]
        )
    return {
        "requests": len(inside),
        "errors": len(inside) - len(ok),
        "documents_reranked": sum(e["documents"] for e in ok),
        "doc_query_pairs": sum(e["queries"] * e["documents"] for e in ok),
        "input_tokens": sum(e["input_tokens"] for e in ok),
        "output_tokens": sum(e["output_tokens"] for e in ok),
        "active_accounts": len({e["tenant_id"] for e in inside}),
        "spend": spend,
        "unpriced": unpriced,
        "inside": inside,
    }


@pytest.fixture
def loaded(client: TestClient, admin_headers: dict[str, str]) -> list[dict[str, Any]]:
    r = client.post(
        "/v1/prices",
        json={
            "provider": "cohere",
            "model": "rerank-4-pro",
            "effective_from": _iso(CHANGE),
            "input_per_1m_tokens": "0.3125",
            "output_per_1m_tokens": "1.5",
            "per_1k_doc_query_pairs": "0.0007",
        },
        headers=admin_headers,
    )
    assert r.status_code == 201, r.text
    events = _workload()
    _post(client, admin_headers, events)
    _post(client, admin_headers, events[:700])  # a retried half: duplicates
    probes = [
        probe(f"fig-p{i}", timestamp=_iso(BASE + timedelta(hours=1, minutes=i)), ok=i % 10 != 0)
        for i in range(20)
    ]
    assert (
        client.post("/v1/probes", json={"probes": probes}, headers=admin_headers).status_code == 202
    )
    return events


def _book(client: TestClient, headers: dict[str, str]) -> PriceBook:
    prices = client.get("/v1/prices", headers=headers).json()["prices"]
    return PriceBook(
        PriceEntry(
            p["id"],
            p["provider"],
            p["model"],
            datetime.fromisoformat(p["effective_from"].replace("Z", "+00:00")),
            p["currency"],
            Decimal(p["input_per_1m_tokens"]),
            Decimal(p["output_per_1m_tokens"]),
            Decimal(p["per_1k_doc_query_pairs"]),
        )
        for p in prices
    )


def test_stats_equal_brute_force_to_the_last_digit(
    client: TestClient, admin_headers: dict[str, str], loaded: list[dict[str, Any]]
) -> None:
    book = _book(client, admin_headers)
    start = BASE + timedelta(minutes=23, seconds=7, milliseconds=5)
    end = BASE + timedelta(hours=27, minutes=41, milliseconds=999)
    r = client.get(
        "/v1/stats", params={"from": _iso(start), "to": _iso(end)}, headers=admin_headers
    )
    assert r.status_code == 200, r.text
    got = r.json()
    want = _brute(loaded, book, start, end)
    for key in (
        "requests",
        "errors",
        "documents_reranked",
        "doc_query_pairs",
        "input_tokens",
        "output_tokens",
        "active_accounts",
    ):
        assert got[key] == want[key], key
    assert Decimal(got["spend_usd"]) == want["spend"]
    assert {(u["provider"], u["model"]) for u in got["unpriced_usage"]} == want["unpriced"]
    assert got["avg_uptime_pct"] == pytest.approx(90.0)
    # The 30-day default window holds the late event of 10 days ago, not that of 45.
    got30 = client.get("/v1/stats", headers=admin_headers).json()
    want30 = _brute(loaded, book, NOW - timedelta(days=30), NOW + timedelta(minutes=5))
    assert got30["requests"] == want30["requests"]
    assert got30["active_accounts"] == want30["active_accounts"]
    assert Decimal(got30["spend_usd"]) == want30["spend"]
    # Windows ending today count today's tenants from the daily bitmap only while nothing
    # is stored after their end: an event 2 minutes ahead (allowed) must not count before.
    ahead = event("fig-ahead", timestamp=_iso(NOW + timedelta(minutes=2)), tenant_id="acct-ahead")
    _post(client, admin_headers, [ahead])
    for end, extra in ((NOW + timedelta(seconds=1), 0), (NOW + timedelta(minutes=3), 1)):
        params = {"from": _iso(end - timedelta(days=30)), "to": _iso(end)}
        got = client.get("/v1/stats", params=params, headers=admin_headers).json()
        want = _brute(loaded, book, end - timedelta(days=30), end)
        assert got["active_accounts"] == want["active_accounts"] + extra
        assert got["requests"] == want["requests"] + extra
    # One tenant, through the admin's tenant_id=.
    one = client.get(
        "/v1/stats",
        params={"from": _iso(start), "to": _iso(end), "tenant_id": "acct-3"},
        headers=admin_headers,
    ).json()
    want_one = _brute([e for e in loaded if e["tenant_id"] == "acct-3"], book, start, end)
    assert one["requests"] == want_one["requests"]
    assert Decimal(one["spend_usd"]) == want_one["spend"]


@pytest.mark.parametrize("granularity", ["hour", "day", "month"])
def test_usage_rows_equal_brute_force(
    client: TestClient,
    admin_headers: dict[str, str],
    loaded: list[dict[str, Any]],
    granularity: str,
) -> None:
    book = _book(client, admin_headers)
    start = BASE + timedelta(hours=2, minutes=50)
    end = BASE + timedelta(hours=9, seconds=30)
    r = client.get(
        "/v1/usage",
        params={
            "from": _iso(start),
            "to": _iso(end),
            "granularity": granularity,
            "group_by": "tenant_id,provider,model",
        },
        headers=admin_headers,
    )
    assert r.status_code == 200, r.text
    want: dict[tuple[str, ...], dict[str, Any]] = defaultdict(
        lambda: {
            "requests": 0,
            "doc_query_pairs": 0,
            "input_tokens": 0,
            "cost": Decimal(0),
            "unpriced": False,
        }
    )
    for e in _brute(loaded, book, start, end)["inside"]:
        t = _ts(e).replace(minute=0, second=0, microsecond=0)
        if granularity != "hour":
            t = t.replace(hour=0)
        if granularity == "month":
            t = t.replace(day=1)
        row = want[(_iso(t), e["tenant_id"], e["provider"], e["model"])]
        row["requests"] += 1
        if e["status"] != "ok":
            continue
        row["doc_query_pairs"] += e["queries"] * e["documents"]
        row["input_tokens"] += e["input_tokens"]
        price = book.price_at(e["provider"], e["model"], _ts(e))
        if price is None:
            row["unpriced"] = row["unpriced"] or bool(
                e["input_tokens"] or e["documents"] or e["output_tokens"]
            )
        else:
            row["cost"] += event_cost(
                price, e["input_tokens"], e["output_tokens"], e["queries"] * e["documents"]
            )
    got = {(s["bucket"], s["tenant_id"], s["provider"], s["model"]): s for s in r.json()["series"]}
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert (g["requests"], g["doc_query_pairs"], g["input_tokens"]) == (
            w["requests"],
            w["doc_query_pairs"],
            w["input_tokens"],
        ), key
        if w["unpriced"]:
            assert g["cost_usd"] is None
        else:
            assert Decimal(g["cost_usd"]) == w["cost"], key


def test_providers_table_counts_fallback_attempts_and_peaks(
    client: TestClient, admin_headers: dict[str, str], loaded: list[dict[str, Any]]
) -> None:
    start = BASE + timedelta(minutes=5, milliseconds=1)
    end = BASE + timedelta(hours=29, minutes=3)
    r = client.get(
        "/v1/providers", params={"from": _iso(start), "to": _iso(end)}, headers=admin_headers
    )
    assert r.status_code == 200, r.text
    inside = [e for e in loaded if start <= _ts(e) < end]
    requests: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    per_second: Counter[tuple[str, datetime]] = Counter()
    for e in inside:
        second = _ts(e).replace(microsecond=0)
        requests[e["provider"]] += 1
        per_second[(e["provider"], second)] += 1
        errors[e["provider"]] += e["status"] == "error"
        for f in e["fallbacks"]:
            requests[f["provider"]] += 1
            errors[f["provider"]] += 1
            per_second[(f["provider"], second)] += 1
    got = {p["provider"]: p for p in r.json()["providers"]}
    for provider in PROVIDERS:
        g = got[provider]
        assert (g["requests"], g["errors"]) == (requests[provider], errors[provider])
        assert g["peak_rps"] == max(c for (p, _), c in per_second.items() if p == provider)
        ok_latencies = sorted(
            e["latency_ms"] for e in inside if e["provider"] == provider and e["status"] == "ok"
        )
        assert g["latency_ms"]["avg"] == pytest.approx(sum(ok_latencies) / len(ok_latencies))
        p50 = ok_latencies[len(ok_latencies) // 2]
        assert g["latency_ms"]["p50"] == pytest.approx(p50, rel=0.03)
    assert got["cohere"]["uptime_pct"] == pytest.approx(90.0)
    assert any(p["model"] == "rerank-4-pro" for p in got["cohere"]["prices"])


def test_whole_hours_and_days_are_read_from_projections(
    services: Services, loaded: list[dict[str, Any]]
) -> None:
    # force_optimize_projection makes ClickHouse refuse a query no projection answers:
    # aligned windows have no raw edges, so each of these must hit a projection.
    force = {"force_optimize_projection": 1}
    hours = Window(BASE, BASE + timedelta(hours=20))
    days = Window(BASE - timedelta(days=3), BASE + timedelta(days=1))
    assert services.events.wait_stored(timeout=30)  # no HTTP read (and its barrier) here
    with services.reads.client() as ch:
        assert facts(ch, hours, [], filters={}, settings=force)
        assert active_accounts(ch, days, settings=force) > 0
        assert active_accounts(ch, hours, settings=force) > 0
        assert provider_figures(ch, hours, None, settings=force)
        # A tenant's hours, and usage grouped by tenant or project, from p_tenant_hourly.
        tenant = {"force_optimize_projection_name": "p_tenant_hourly"}
        one = facts(ch, hours, [], filters={"tenant_id": "acct-3"}, settings=tenant)
        assert one and all(f.requests for f in one)
        grouped = facts(ch, hours, [], filters={}, group=("project_id",), settings=tenant)
        assert {f.keys for f in grouped} == {("proj-1",), ("proj-2",), ("proj-3",)}


def test_cached_hourly_peaks_follow_late_events(
    client: TestClient, admin_headers: dict[str, str], loaded: list[dict[str, Any]]
) -> None:
    window = {"from": _iso(BASE), "to": _iso(BASE + timedelta(hours=30))}

    def peaks() -> dict[str, int]:
        r = client.get("/v1/providers", params=window, headers=admin_headers)
        assert r.status_code == 200, r.text
        return {p["provider"]: p["peak_rps"] for p in r.json()["providers"]}

    before = peaks()
    assert peaks() == before  # the second read takes the cached hours
    # Late events all in one second of an hour that is cached by now: a new peak.
    second = BASE + timedelta(hours=3, minutes=7, seconds=11)
    late = [
        event(f"late-{i}", timestamp=_iso(second + timedelta(milliseconds=i)), provider="azure")
        for i in range(before["azure"] + 3)
    ]
    _post(client, admin_headers, late)
    after = peaks()
    assert after["azure"] >= before["azure"] + 3
    assert after["azure"] == before["azure"] + 3 or after["azure"] > len(late)


def test_windows_without_a_price_change_are_exact_too(
    client: TestClient, admin_headers: dict[str, str], loaded: list[dict[str, Any]]
) -> None:
    # No boundary in the window: spans are the buckets themselves (no per-row search).
    book = _book(client, admin_headers)
    start = BASE + timedelta(minutes=31, milliseconds=7)
    end = BASE + timedelta(hours=4, minutes=2)
    assert book.boundaries(start, end) == []
    want = _brute(loaded, book, start, end)
    params = {"from": _iso(start), "to": _iso(end)}
    stats = client.get("/v1/stats", params=params, headers=admin_headers).json()
    assert (stats["requests"], Decimal(stats["spend_usd"])) == (want["requests"], want["spend"])
    for granularity in ("hour", "day"):
        series = client.get(
            "/v1/usage",
            params={**params, "granularity": granularity, "group_by": "tenant_id,model"},
            headers=admin_headers,
        ).json()["series"]
        assert sum(row["requests"] for row in series) == want["requests"]
        priced = [Decimal(row["cost_usd"]) for row in series if row["cost_usd"] is not None]
        assert {row["model"] for row in series if row["cost_usd"] is None} <= {"mystery-model"}
        assert sum(priced) == want["spend"]
