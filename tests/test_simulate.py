"""`metering simulate`: the traffic model, backfill, demo data and live mode, on real
engines (chDB + SQLite/PostgreSQL from the conftest fixtures)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import numpy as np
import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from metering import simulate
from metering.clickhouse import migrations as ch_migrations
from metering.client import MeteringClient
from metering.db import migrations as relational_migrations
from metering.db.engine import make_engine
from metering.ingest.decode import EVENTS, PROBES, decode_batch
from metering.services import Services
from metering.settings import Settings
from metering.tenants.models import Project, Tenant

END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
PLAN = simulate.BackfillPlan(days=2, events=20_000, tenants=300, seed=7, end=END)

EVENT_COLUMNS = (
    "event_id, timestamp, tenant_id, project_id, api_key_id, provider, model, region, status,"
    " http_status, error_type, queries, documents, input_tokens, output_tokens, latency_ms,"
    " fallbacks"
)


@dataclass
class Filled:
    ch: Client
    engine: Engine
    report: simulate.BackfillReport


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    relational_migrations.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def filled(ch_client: Client, engine: Engine) -> Filled:
    ch_migrations.migrate(ch_client)
    report = simulate.backfill(ch_client, engine, PLAN)
    return Filled(ch_client, engine, report)


def scalar(ch: Client, sql: str, **params: Any) -> Any:
    return ch.query(sql, parameters=params).result_rows[0][0]


def as_contract_event(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as the JSON event a gateway would have sent (0 / '' = absent)."""
    event = {k: v for k, v in row.items() if v not in ("", 0) or k == "output_tokens"}
    event["timestamp"] = row["timestamp"].replace(tzinfo=UTC).isoformat()
    event["fallbacks"] = [
        {k: v for k, v in fb.items() if v not in ("", 0)} for fb in row["fallbacks"]
    ]
    return event


def stored_events(ch: Client, limit: int = 1_000_000) -> list[dict[str, Any]]:
    result = ch.query(f"SELECT {EVENT_COLUMNS} FROM rerank_events ORDER BY event_id LIMIT {limit}")
    return [
        as_contract_event(dict(zip(result.column_names, r, strict=True)))
        for r in result.result_rows
    ]


def test_backfill_stores_each_event_once_with_its_id_and_registers_tenants(
    filled: Filled,
) -> None:
    ch = filled.ch
    assert filled.report.events == 20_000
    assert scalar(ch, "SELECT count() FROM rerank_events") == 20_000
    assert scalar(ch, "SELECT uniqExact(event_id) FROM rerank_events") == 20_000
    assert scalar(ch, "SELECT countIf(startsWith(event_id, 'sim-7-')) FROM rerank_events") == 20_000
    assert (
        scalar(
            ch,
            "SELECT count() FROM ingested_ids WHERE stream = 'events'"
            " AND id IN (SELECT event_id FROM rerank_events)",
        )
        == 20_000
    )
    lo, hi = ch.query("SELECT min(timestamp), max(timestamp) FROM rerank_events").result_rows[0]
    assert END - timedelta(days=2) <= lo.replace(tzinfo=UTC) and hi.replace(tzinfo=UTC) < END

    probes = 2 * 2880 * len(simulate.PROVIDERS)  # one per provider every 30 s
    assert filled.report.probes == probes
    assert scalar(ch, "SELECT count() FROM uptime_probes") == probes
    assert (
        scalar(
            ch,
            "SELECT count() FROM ingested_ids WHERE stream = 'probes'"
            " AND id IN (SELECT probe_id FROM uptime_probes)",
        )
        == probes
    )

    tenants = {r[0] for r in ch.query("SELECT DISTINCT tenant_id FROM rerank_events").result_rows}
    pairs = {
        (r[0], r[1])
        for r in ch.query("SELECT DISTINCT tenant_id, project_id FROM rerank_events").result_rows
    }
    with filled.engine.connect() as conn:
        assert set(conn.scalars(select(Tenant.id))) == tenants
        assert {tuple(r) for r in conn.execute(select(Project.tenant_id, Project.id))} == pairs
    assert (filled.report.tenants, filled.report.projects) == (len(tenants), len(pairs))
    assert all(1 <= int(p.rsplit("-", 1)[1]) <= 5 for _, p in pairs)


def test_backfill_follows_the_traffic_model(filled: Filled) -> None:
    ch = filled.ch
    rows = ch.query(
        "SELECT provider, any(region), count(), quantile(0.5)(latency_ms) FROM rerank_events"
        " WHERE status = 'ok' AND empty(fallbacks) GROUP BY provider"
    ).result_rows
    by_name = {p.name: p for p in simulate.PROVIDERS}
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
    assert docs == pytest.approx(simulate.DOCUMENTS_MEAN, rel=0.06)
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
    modelled = sum(p.uptime for p in simulate.PROVIDERS) / len(simulate.PROVIDERS)
    assert uptime == pytest.approx(modelled, abs=0.002)


def test_every_simulated_event_and_probe_is_a_valid_contract_item(filled: Filled) -> None:
    events = stored_events(filled.ch)
    assert len(events) == 20_000
    assert any(e["fallbacks"] for e in events) and any(e["status"] == "error" for e in events)
    for start in range(0, len(events), 10_000):
        body = msgspec.json.encode({"events": events[start : start + 10_000]})
        decoded = decode_batch(EVENTS, body, ndjson=False)
        assert decoded.rejected == [] and len(decoded.items) == 10_000

    result = filled.ch.query(
        "SELECT probe_id, timestamp, provider, region, ok, latency_ms, http_status, error"
        " FROM uptime_probes"
    )
    probes = [
        {k: v for k, v in zip(result.column_names, r, strict=True) if v not in ("", 0)}
        | {"timestamp": r[1].replace(tzinfo=UTC).isoformat(), "ok": r[4], "latency_ms": r[5]}
        for r in result.result_rows
    ]
    decoded_probes = decode_batch(
        PROBES, msgspec.json.encode({"probes": probes[:10_000]}), ndjson=False
    )
    assert decoded_probes.rejected == []

    # The live path's JSON (built in Python, not in ClickHouse) is valid too, and names
    # tenants exactly as the backfill's SQL does.
    fill = simulate.Backfill(PLAN)
    cols = fill.chunk(0)
    python_events = simulate.event_dicts(cols, fill.tenants, fill.event_ids(0, len(cols)))
    body = msgspec.json.encode({"events": python_events[:10_000]})
    assert decode_batch(EVENTS, body, ndjson=False).rejected == []
    for made in python_events[:200]:
        stored = next(e for e in events if e["event_id"] == made["event_id"])
        for key in ("tenant_id", "project_id", "api_key_id", "provider", "region", "documents"):
            assert stored[key] == made[key]


def test_backfill_is_reproducible_per_seed() -> None:
    first = simulate.Backfill(PLAN).chunk(0)
    again = simulate.Backfill(PLAN).chunk(0)
    other = simulate.Backfill(simulate.BackfillPlan(2, 20_000, 300, 8, END)).chunk(0)
    assert np.array_equal(first.documents, again.documents)
    assert np.array_equal(first.timestamp_ms, again.timestamp_ms)
    assert not np.array_equal(first.documents, other.documents)


def test_documents_mean_matches_the_seed_page() -> None:
    rng = np.random.default_rng(0)
    docs = np.clip(np.rint(rng.lognormal(simulate.documents_mu(), 1.0, 2_000_000)), 1, 1000)
    # 24.5M requests x mean = 3.8B documents
    assert docs.mean() * 24.5e6 == pytest.approx(3.8e9, rel=0.005)


def _backfill_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    return parser.parse_args(
        [
            "backfill",
            "--days",
            "1",
            "--events",
            "3000",
            "--tenants",
            "50",
            "--seed",
            "3",
            "--end",
            END.isoformat(),
            *extra,
        ]
    )


def test_rerunning_the_same_backfill_refuses_and_stores_nothing_twice(
    settings: Settings, ch_client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    assert simulate.main(_backfill_args(), settings) == 0
    assert "3,000 events" in capsys.readouterr().out
    counts = ch_client.query(
        "SELECT (SELECT count() FROM rerank_events), (SELECT count() FROM uptime_probes),"
        " (SELECT count() FROM ingested_ids)"
    ).result_rows[0]

    assert simulate.main(_backfill_args(), settings) == 1
    err = capsys.readouterr().err
    assert "already stored" in err and "--seed" in err
    assert (
        ch_client.query(
            "SELECT (SELECT count() FROM rerank_events), (SELECT count() FROM uptime_probes),"
            " (SELECT count() FROM ingested_ids)"
        ).result_rows[0]
        == counts
    )

    # Another seed adds to it.
    assert simulate.main(_backfill_args("--seed", "4"), settings) == 0
    assert scalar(ch_client, "SELECT count() FROM rerank_events") == 6000


def test_backfill_refuses_events_outside_the_acceptance_window(settings: Settings) -> None:
    too_old = datetime.now(UTC) - timedelta(days=399)
    assert simulate.main(_backfill_args("--end", too_old.isoformat(), "--days", "2"), settings) == 2
    with pytest.raises(simulate.BackfillError):
        simulate.BackfillPlan(1, 10, 5, 1, datetime.now(UTC) + timedelta(hours=1)).validate(
            datetime.now(UTC)
        )


def test_demo_hook_fills_an_empty_store_and_the_gate_knows_its_ids(
    client: TestClient,
    services: Services,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(simulate, "DEMO_EVENTS", 30_000)
    monkeypatch.setattr(simulate, "DEMO_TENANTS", 200)
    simulate.demo_hook(services)
    assert scalar(services.ch, "SELECT count() FROM rerank_events") == 30_000
    assert scalar(services.ch, "SELECT count() FROM uptime_probes") == 30 * 2880 * 4
    with services.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Tenant)) == scalar(
            services.ch, "SELECT uniqExact(tenant_id) FROM rerank_events"
        )

    event = stored_events(services.ch, limit=1)[0]
    response = client.post("/v1/events", json={"events": [event]}, headers=admin_headers)
    assert response.status_code == 202
    assert response.json() == {"accepted": 0, "duplicates": 1, "rejected": []}

    simulate.demo_hook(services)  # not empty any more: does nothing
    assert scalar(services.ch, "SELECT count() FROM rerank_events") == 30_000


def test_live_sends_events_and_probes_through_the_gateway_client(
    client: TestClient,
    services: Services,
) -> None:
    sender = MeteringClient(
        "http://testserver",
        "test-admin-token",
        max_batch=500,
        flush_interval=0.1,
        transport=client._transport,  # the app, in process
    )
    try:
        report = simulate.live(sender, rate=2000, duration=0.5, seed=5, tenants=50, tick=0.05)
    finally:
        sender.close(timeout=10)
    assert report.generated_events == 1000  # rate x duration
    assert report.generated_probes == len(simulate.PROVIDERS)
    assert report.stats["accepted"] == report.generated_events + report.generated_probes
    assert report.stats["rejected"] == 0 and report.stats["duplicates"] == 0
    assert services.events.wait_stored(timeout=10)
    assert scalar(services.ch, "SELECT count() FROM rerank_events") == report.generated_events
