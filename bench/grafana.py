"""The Grafana dashboards' panel queries on a seed-scale month, next to the service's own
reads of the same figures, in one run.

    .venv/bin/python -m bench.grafana                         # 30 days, seed month: 24.5M
    .venv/bin/python -m bench.grafana --events 2000000 --tenants 20000
    .venv/bin/python -m bench.grafana --data-dir /tmp/seed --results bench/RESULTS.md

1. Fill: `backfill` of `--days` days into a fresh chDB path (or reuse `--data-dir`).
2. For every panel (and the tenant variable): expand its SQL as Grafana and the plugin do
   (tests/dashboards/macros.py) for the whole filled range at a 1 h interval (what Grafana
   picks for 30 days on a ~1,000 px panel), then time one warm-up plus `--runs` runs.
3. Baselines measured in the same process, interleaved: the service's own reads of the same
   figures (`/v1/stats`' four cards: facts + active_accounts + probe_counts; `/v1/providers`:
   provider_figures), and a raw `count()` of the range (the cheapest full read).
4. Print p50 per panel, its ratio to the raw count, and the cards' and comparison table's
   ratio to the service's reads; append the table to `--results` with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from metering.analytics.facts import active_accounts, facts, probe_counts  # noqa: E402
from metering.analytics.providers import provider_figures  # noqa: E402
from metering.analytics.window import Window  # noqa: E402
from metering.clickhouse import migrations as ch_migrations  # noqa: E402
from metering.clickhouse.client import make_client  # noqa: E402
from metering.dashboards.build import BOARDS  # noqa: E402
from metering.db import migrations as relational_migrations  # noqa: E402
from metering.db.engine import make_engine  # noqa: E402
from metering.simulate.backfill import BackfillPlan, backfill  # noqa: E402
from metering.simulate.model import SEED_MONTH_DAYS, SEED_MONTH_EVENTS  # noqa: E402
from tests.dashboards.macros import QueryContext, expand  # noqa: E402

SCAN = "SELECT count() FROM rerank_events WHERE $__timeFilter(timestamp)"


def _timed(run: Callable[[], Any], runs: int) -> float:
    run()  # warm-up
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--tenants", type=int, default=210_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    events = args.events or round(SEED_MONTH_EVENTS * args.days / SEED_MONTH_DAYS)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-grafana-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    ch = make_client(f"chdb://{data_dir / 'ch'}", "bench")
    engine = make_engine(f"sqlite:///{data_dir / 'metering.db'}")
    relational_migrations.upgrade(engine)
    ch_migrations.migrate(ch)
    stored = int(ch.query("SELECT count() FROM rerank_events").result_rows[0][0])
    if stored == 0:
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        plan = BackfillPlan(days=args.days, events=events, tenants=args.tenants, seed=1, end=end)
        t0 = time.perf_counter()
        backfill(ch, engine, plan)
        print(f"backfill: {events:,} events in {time.perf_counter() - t0:.1f} s", flush=True)
        stored = events
    bounds = ch.query("SELECT min(timestamp), max(timestamp) FROM rerank_events")
    first, last = bounds.result_rows[0]
    start = first.replace(tzinfo=UTC).replace(second=0, microsecond=0)
    stop = last.replace(tzinfo=UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    ctx = QueryContext(start, stop, timedelta(hours=1))
    window = Window(start, stop)
    load_before = _load()

    def scan() -> Any:
        return ch.query(expand(SCAN, ctx))

    def service_stats() -> Any:
        return (
            facts(ch, window, [], filters={}, bucket=None),
            active_accounts(ch, window),
            probe_counts(ch, window),
        )

    def service_providers() -> Any:
        return provider_figures(ch, window, None)

    (variable,) = [v for b in BOARDS for v in b.variables]
    tenant = ch.query(expand(variable.sql, ctx)).result_rows[0][0]
    variables = {variable.name: str(tenant)}
    rows: list[tuple[str, str, str, float, float]] = []
    cards = 0.0
    comparison = 0.0
    baselines = {"scan": [], "stats": [], "providers": []}  # type: dict[str, list[float]]
    queries = [("variable", variable.name, variable.sql, "rows")] + [
        (b.uid, p.title, p.sql, "rollup" if p.rollup else "rows")
        for b in BOARDS
        for p in b.panels
        if p.kind != "text"
    ]
    for uid, title, sql, source in queries:
        expanded = expand(sql, ctx, variables)
        baselines["scan"].append(_timed(scan, args.runs))
        ms = _timed(lambda e=expanded: ch.query(e), args.runs)  # type: ignore[misc]
        rows.append((uid, title, source, ms, ms / baselines["scan"][-1]))
        if (
            uid == "rerank-overview"
            and title
            in (
                "Documents reranked",
                "API requests",
                "Active developer accounts",
                "Average uptime",
            )
            and "$__fromTime" in sql
        ):
            cards += ms
            baselines["stats"].append(_timed(service_stats, args.runs))
        if title == "Provider comparison":
            comparison = ms
            baselines["providers"].append(_timed(service_providers, args.runs))
    scan_ms = statistics.median(baselines["scan"])
    stats_ms = statistics.median(baselines["stats"])
    providers_ms = statistics.median(baselines["providers"])
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"### bench/grafana.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{shlex.join(['python', '-m', 'bench.grafana', *sys.argv[1:]])}`  ",
        f"Machine: {os.cpu_count()} cores, load {load_before} before, {_load()} after; "
        f"code {commit} + working tree  ",
        f"Data: {stored:,} events, {start:%Y-%m-%d %H:%M} .. {stop:%Y-%m-%d %H:%M} UTC; "
        f"interval 1 h; p50 of {args.runs} runs after a warm-up, in ms  ",
        f"Baselines (same run, interleaved, medians): raw `count()` of the range "
        f"{scan_ms:.1f} ms; service's /v1/stats cards (facts + active_accounts + "
        f"probe_counts) {stats_ms:.1f} ms; service's provider_figures {providers_ms:.1f} ms",
        "",
        "| dashboard | panel | reads | p50 ms | x raw count |",
        "|---|---|---|---|---|",
        *(f"| {u} | {t} | {src} | {ms:.1f} | {r:.1f} |" for u, t, src, ms, r in rows),
        "",
        f"Overview's four cards together: {cards:.1f} ms = {cards / stats_ms:.2f} x the "
        f"service's reads of the same figures. Provider comparison table: {comparison:.1f} ms "
        f"= {comparison / providers_ms:.2f} x provider_figures.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with args.results.open("a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
