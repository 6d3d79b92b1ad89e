"""The backfill: each event stored once with its id, tenants registered, reproducible per
seed, and `metering simulate backfill` refusing a re-run or a window outside the contract's."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from clickhouse_connect.driver.client import Client
from sqlalchemy import select

from metering import cli
from metering.settings import Settings
from metering.simulate.backfill import Backfill, BackfillError, BackfillPlan
from metering.simulate.model import PROVIDERS
from metering.tenants.models import Project, Tenant
from tests.simulate.helpers import END, PLAN, Filled, scalar


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

    probes = 2 * 2880 * len(PROVIDERS)  # one per provider every 30 s
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


def test_backfill_is_reproducible_per_seed() -> None:
    first = Backfill(PLAN).chunk(0)
    again = Backfill(PLAN).chunk(0)
    other = Backfill(BackfillPlan(2, 20_000, 300, 8, END)).chunk(0)
    assert np.array_equal(first.documents, again.documents)
    assert np.array_equal(first.timestamp_ms, again.timestamp_ms)
    assert not np.array_equal(first.documents, other.documents)


def _backfill_args(*extra: str) -> argparse.Namespace:
    return cli._parser().parse_args(
        [
            "simulate",
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
    assert cli._simulate(_backfill_args(), settings) == 0
    assert "3,000 events" in capsys.readouterr().out
    counts = ch_client.query(
        "SELECT (SELECT count() FROM rerank_events), (SELECT count() FROM uptime_probes),"
        " (SELECT count() FROM ingested_ids)"
    ).result_rows[0]

    assert cli._simulate(_backfill_args(), settings) == 1
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
    assert cli._simulate(_backfill_args("--seed", "4"), settings) == 0
    assert scalar(ch_client, "SELECT count() FROM rerank_events") == 6000


def test_backfill_refuses_events_outside_the_acceptance_window(settings: Settings) -> None:
    too_old = datetime.now(UTC) - timedelta(days=399)
    assert cli._simulate(_backfill_args("--end", too_old.isoformat(), "--days", "2"), settings) == 2
    with pytest.raises(BackfillError):
        BackfillPlan(1, 10, 5, 1, datetime.now(UTC) + timedelta(hours=1)).validate(
            datetime.now(UTC)
        )
