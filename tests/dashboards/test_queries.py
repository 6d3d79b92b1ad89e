"""Every panel and variable query of the Grafana dashboards, run on chDB against a
simulated backfill after Grafana's and the plugin's expansion (tests/dashboards/macros.py),
returns the columns its panel expects; the figures the service also computes agree with
the service's own queries over the same window."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from metering.analytics.facts import active_accounts, facts, probe_counts
from metering.analytics.providers import provider_figures
from metering.analytics.window import Window
from metering.clickhouse import migrations as ch_migrations
from metering.clickhouse.client import forget_database, make_client
from metering.dashboards import overview, providers, tenant
from metering.dashboards.build import BOARDS, dashboards
from metering.dashboards.spec import EDGES, Board, Panel
from metering.db import migrations as relational_migrations
from metering.db.engine import make_engine
from metering.simulate.backfill import BackfillPlan, backfill
from tests.dashboards.macros import QueryContext, expand

END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
PLAN = BackfillPlan(days=2, events=20_000, tenants=300, seed=11, end=END)
# A range with ragged edges (not on hours or days), as a user's zoom gives.
RANGE = QueryContext(
    start=END - timedelta(days=1, hours=17, minutes=13, seconds=7),
    end=END - timedelta(minutes=41, seconds=29),
    interval=timedelta(minutes=30),
)
NUMERIC = re.compile(r"^(Nullable\()?(U?Int(8|16|32|64|128|256)|Float(32|64)|Decimal.*)\)?$")
TEXT = re.compile(r"^(LowCardinality\()?(Nullable\()?String\)?\)?$")
TIME = re.compile(r"^DateTime(64)?(\(|$)")


@pytest.fixture(scope="module")
def ch(chdb_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """One backfilled database for the module: the queries only read it."""
    url = f"chdb://{chdb_path}"
    name = f"dash_{uuid.uuid4().hex[:12]}"
    client = make_client(url, name)
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('dash') / 'metering.db'}")
    try:
        relational_migrations.upgrade(engine)
        ch_migrations.migrate(client)
        backfill(client, engine, PLAN)
        yield client
    finally:
        engine.dispose()
        client.command(f"DROP DATABASE IF EXISTS `{name}`")
        forget_database(url, name)
        client.close()


@pytest.fixture(scope="module")
def variables(ch: Client) -> dict[str, str]:
    """The tenant variable's first value (the most active tenant), as Grafana picks it."""
    (variable,) = [v for board in BOARDS for v in board.variables]
    result = ch.query(expand(variable.sql, RANGE))
    assert tuple(result.column_names) == variable.columns
    assert TEXT.match(result.column_types[0].name)
    values = [row[0] for row in result.result_rows]
    assert 0 < len(values) <= 1000
    return {variable.name: values[0]}


def _run(ch: Client, sql: str, variables: dict[str, str]) -> Any:
    return ch.query(expand(sql, RANGE, variables))


QUERIES = [
    pytest.param(board, panel, id=f"{board.uid}:{panel.title}:{panel.kind}")
    for board in BOARDS
    for panel in board.panels
    if panel.kind != "text"
]


@pytest.mark.parametrize(("board", "panel"), QUERIES)
def test_panel_query_returns_the_columns_its_panel_expects(
    ch: Client, variables: dict[str, str], board: Board, panel: Panel
) -> None:
    result = _run(ch, panel.sql, variables)
    names = tuple(result.column_names)
    types = [t.name for t in result.column_types]
    assert names == panel.columns, types
    assert result.result_rows, "no rows on a backfilled range"
    if panel.kind == "stat":
        assert len(result.result_rows) == 1
        assert NUMERIC.match(types[0]), types
    if panel.is_series:
        assert names[0] == "time" and TIME.match(types[0]), types
        labels = len(panel.labels)
        assert names[1 : 1 + labels] == panel.labels
        assert all(TEXT.match(t) for t in types[1 : 1 + labels]), types
        assert types[1 + labels :] and all(NUMERIC.match(t) for t in types[1 + labels :]), types
        times = [row[0] for row in result.result_rows]
        assert times == sorted(times), "a time series must come in time order"
        # Buckets (of the interval, or UTC days) start at most a day before the range.
        first, last = times[0].replace(tzinfo=UTC), times[-1].replace(tzinfo=UTC)
        assert RANGE.start - timedelta(days=1) < first and last <= RANGE.end
    if panel.kind == "table":
        for name, t in zip(names, types, strict=True):
            known = NUMERIC.match(t) or TEXT.match(t) or TIME.match(t) or t.startswith("Enum8(")
            assert known, (name, t)


def test_tenant_variable_lists_the_most_active_tenants_first(
    ch: Client, variables: dict[str, str]
) -> None:
    busiest = ch.query(
        expand(
            "SELECT tenant_id, count() AS n FROM rerank_events WHERE $__timeFilter(timestamp)"
            " GROUP BY tenant_id ORDER BY n DESC, tenant_id LIMIT 1",
            RANGE,
        )
    ).result_rows[0][0]
    assert variables["tenant"] == busiest
    tenant_rows = _run(ch, tenant.REQUESTS, variables).result_rows[0][0]
    assert 0 < tenant_rows < _scalar(ch, overview.REQUESTS)


def test_every_target_of_the_json_is_a_spec_query() -> None:
    """The JSON Grafana gets carries exactly the SQL the other tests ran."""
    for model, board in zip(dashboards(), BOARDS, strict=True):
        sqls = [t["rawSql"] for p in model["panels"] for t in p.get("targets", [])]
        assert sqls == [p.sql for p in board.panels if p.kind != "text"]
        variable_sqls = [v["query"]["rawSql"] for v in model.get("templating", {}).get("list", [])]
        assert variable_sqls == [v.sql for v in board.variables]


def _window() -> Window:
    """The service's window for the same range: [from, to) to the second, as
    $__fromTime/$__toTime pass it."""
    return Window(
        datetime.fromtimestamp(int(RANGE.start.timestamp()), UTC),
        datetime.fromtimestamp(int(RANGE.end.timestamp()), UTC),
    )


def _scalar(ch: Client, sql: str) -> Any:
    return ch.query(expand(sql, RANGE)).result_rows[0][0]


def test_overview_figures_equal_the_services(ch: Client) -> None:
    window = _window()
    rows = facts(ch, window, [], filters={}, bucket=None)
    assert _scalar(ch, overview.REQUESTS) == sum(f.requests for f in rows) > 0
    assert _scalar(ch, overview.DOCUMENTS_RERANKED) == sum(
        f.documents for f in rows if f.status == "ok"
    )
    assert _scalar(ch, overview.ACTIVE_ACCOUNTS) == active_accounts(ch, window) > 0
    ok, probes = map(sum, zip(*probe_counts(ch, window).values(), strict=True))
    assert _scalar(ch, overview.AVG_UPTIME) == pytest.approx(100 * ok / probes, rel=1e-12)


def test_uptime_is_null_without_probes(ch: Client) -> None:
    empty = QueryContext(END + timedelta(days=30), END + timedelta(days=31), RANGE.interval)
    assert ch.query(expand(overview.AVG_UPTIME, empty)).result_rows == [(None,)]


def test_series_buckets_add_up_to_the_hours_of_the_range(ch: Client) -> None:
    """Hourly series cover every hour the range touches, whole; their buckets (the
    interval, at least an hour) partition those hours' events."""
    series = ch.query(expand(overview.REQUESTS_SERIES, RANGE)).result_rows
    hours = ch.query(
        expand(
            "SELECT count() FROM rerank_events WHERE timestamp >= toStartOfHour($__fromTime)"
            " AND timestamp < toStartOfHour($__toTime) + INTERVAL 1 HOUR",
            RANGE,
        )
    ).result_rows[0][0]
    assert sum(n for _, n in series) == hours > 0
    step = int(RANGE.interval.total_seconds())
    assert step < 3600  # so the bucket is the hour floor
    assert all(int(t.replace(tzinfo=UTC).timestamp()) % 3600 == 0 for t, _ in series)
    coarse = QueryContext(RANGE.start, RANGE.end, timedelta(hours=6))
    coarse_series = ch.query(expand(overview.REQUESTS_SERIES, coarse)).result_rows
    assert sum(n for _, n in coarse_series) == hours
    assert all(int(t.replace(tzinfo=UTC).timestamp()) % 21600 == 0 for t, _ in coarse_series)


ROLLUPS = [
    pytest.param(panel, id=f"{board.uid}:{panel.title}")
    for board in BOARDS
    for panel in board.panels
    if panel.rollup
]


AGGREGATE_PROJECTIONS = ("p_hourly", "p_hourly_tenants", "p_daily_tenants")
READS = re.compile(
    r"ReadFromMergeTree \((?P<source>[^)]+)\)(?:(?!ReadFromMergeTree).)*?Granules: (?P<n>\d+)",
    re.S,
)


def _reads(ch: Client, sql: str) -> list[str]:
    """The sources the plan reads granules from (EXPLAIN's ReadFromMergeTree steps)."""
    plan = "\n".join(row[0] for row in ch.query("EXPLAIN " + sql).result_rows)
    return [m.group("source") for m in READS.finditer(plan) if int(m.group("n"))]


@pytest.mark.parametrize("panel", ROLLUPS)
def test_platform_panels_are_answered_from_the_rollups(ch: Client, panel: Panel) -> None:
    """A platform panel reads aggregate projections, never the events (probes are few),
    except for an exact window's edges (less than an hour at each end, read from rows as the service
    does): with the edges taken out, every read is a projection's."""
    sql = expand(panel.sql.replace(EDGES, "0"), RANGE)
    reads = [source for source in _reads(ch, sql) if not source.endswith(".uptime_probes")]
    assert reads and all(source in AGGREGATE_PROJECTIONS for source in reads), reads


def test_the_rollup_check_sees_a_scan(ch: Client) -> None:
    scan = "SELECT uniqExact(tenant_id) FROM rerank_events WHERE $__timeFilter(timestamp)"
    reads = _reads(ch, expand(scan, RANGE))
    assert reads and not any(source in AGGREGATE_PROJECTIONS for source in reads)


def test_provider_comparison_equals_the_services(ch: Client) -> None:
    window = _window()
    expected = provider_figures(ch, window, None)
    uptime = probe_counts(ch, window)
    assert uptime
    table = ch.query(expand(providers.COMPARISON, RANGE)).named_results()
    rows = {row["provider"]: row for row in table}
    assert set(rows) == set(expected)
    attempts = (
        "SELECT count() FROM rerank_events ARRAY JOIN fallbacks WHERE $__timeFilter(timestamp)"
    )
    assert _scalar(ch, attempts) > 0, "the data should hold failed fallback attempts"
    for name, figures in expected.items():
        row = rows[name]
        assert (row["requests"], row["errors"]) == (figures.requests, figures.errors)
        if figures.ok_requests:
            assert row["latency_avg_ms"] == pytest.approx(
                figures.latency_sum / figures.ok_requests, rel=1e-9
            )
            percentiles = [row[f"latency_p{q}_ms"] for q in (50, 95, 99)]
            assert percentiles == pytest.approx(figures.quantiles, rel=0.02)
        if name in uptime:
            ok, probes = uptime[name]
            assert row["uptime_pct"] == pytest.approx(100 * ok / probes, rel=1e-12)
        else:
            assert row["uptime_pct"] is None
