"""The traffic model: the seed page's figures and the shape of real traffic, measured on a
backfilled store."""

from __future__ import annotations

import numpy as np
import pytest

from metering.simulate.model import DOCUMENTS_MEAN, PROVIDERS, documents_mu
from tests.simulate.helpers import Filled, scalar


def test_backfill_follows_the_traffic_model(filled: Filled) -> None:
    ch = filled.ch
    rows = ch.query(
        "SELECT provider, any(region), count(), quantile(0.5)(latency_ms) FROM rerank_events"
        " WHERE status = 'ok' AND empty(fallbacks) GROUP BY provider"
    ).result_rows
    by_name = {p.name: p for p in PROVIDERS}
    total = sum(r[2] for r in rows)
    for name, region, count, p50 in rows:
        spec = by_name[name]
        assert region == spec.region
        assert count / total == pytest.approx(spec.share, abs=0.02)
        assert p50 == pytest.approx(spec.typical_latency_ms, rel=0.12)

    errors, with_fallbacks_ok, docs, multi = ch.query(
        "SELECT countIf(status = 'error'), countIf(status = 'ok' AND notEmpty(fallbacks)),"
        " avg(documents), countIf(queries > 1) FROM rerank_events"
    ).result_rows[0]
    assert 0.004 <= errors / 20_000 <= 0.009
    assert 0.015 <= with_fallbacks_ok / 20_000 <= 0.025
    assert docs == pytest.approx(DOCUMENTS_MEAN, rel=0.06)
    assert 0.02 <= multi / 20_000 <= 0.04
    assert scalar(ch, "SELECT min(documents) FROM rerank_events") >= 1
    assert scalar(ch, "SELECT max(documents) FROM rerank_events") <= 1000
    assert scalar(ch, "SELECT max(output_tokens) FROM rerank_events") == 0
    error_rows = ch.query(
        "SELECT DISTINCT error_type, http_status FROM rerank_events WHERE status = 'error'"
    ).result_rows
    assert {e for e, _ in error_rows} == {"timeout", "rate_limited", "provider_5xx"}
    assert all(s == 429 or s >= 500 for _, s in error_rows)
    # Fallback attempts went to other providers than the one that served.
    assert (
        scalar(
            ch,
            "SELECT countIf(has(arrayMap(f -> f.provider, fallbacks), provider))"
            " FROM rerank_events",
        )
        == 0
    )

    # Daily cycle: the busiest hours (around 13:00 UTC) carry ~3x the quietest (01:00).
    result = ch.query("SELECT toHour(timestamp) AS h, count() FROM rerank_events GROUP BY h")
    hours: dict[int, int] = {int(h): int(n) for h, n in result.result_rows}
    peak = sum(hours[h] for h in (12, 13, 14))
    trough = sum(hours[h] for h in (0, 1, 2))
    assert 2.4 <= peak / trough <= 3.6

    uptime = scalar(ch, "SELECT avg(ok) FROM uptime_probes")
    modelled = sum(p.uptime for p in PROVIDERS) / len(PROVIDERS)
    assert uptime == pytest.approx(modelled, abs=0.002)


def test_documents_mean_matches_the_seed_page() -> None:
    rng = np.random.default_rng(0)
    docs = np.clip(np.rint(rng.lognormal(documents_mu(), 1.0, 2_000_000)), 1, 1000)
    # 24.5M requests x mean = 3.8B documents
    assert docs.mean() * 24.5e6 == pytest.approx(3.8e9, rel=0.005)
