"""Benchmark `metering simulate backfill` against the engine's own ceiling.

    python bench/backfill.py                      # one seed month: 24.5M events, 210K tenants
    python bench/backfill.py --events 2000000     # smaller

Two phases, each in its own subprocess on its own fresh chDB path in a temp dir (chDB
allows one data path per process, and a separate process gives each phase its own peak
RSS):

1. backfill: `metering.simulate.backfill.backfill` of `--days` days ending now: events, their ids,
   probes, and tenant/project registration in SQLite, exactly what the CLI does.
2. baseline: `INSERT INTO rerank_events SELECT ... FROM numbers(N)` into an identical,
   freshly migrated table: values computed from hashes of the row number with the same
   cardinalities (tenants, projects, providers, documents), one statement. This is what
   the engine can store when nothing has to be generated outside it.

Prints rows/s of both, their ratio and each phase's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BASELINE_SQL = """
INSERT INTO rerank_events (event_id, timestamp, tenant_id, project_id, api_key_id, provider,
    model, region, status, http_status, error_type, queries, documents, input_tokens,
    output_tokens, latency_ms, fallbacks)
SELECT
    concat('base-', toString(number)),
    fromUnixTimestamp64Milli({start_ms:Int64} + intDiv(number * {span_ms:Int64}, {n:UInt64}),
                             'UTC'),
    concat('acct-', leftPad(toString(h % {tenants:UInt64} + 1), 6, '0')),
    concat('proj-', leftPad(toString(h % {tenants:UInt64} + 1), 6, '0'), '-',
           toString(bitShiftRight(h, 40) % 3 + 1)),
    concat('key-', leftPad(toString(h % {tenants:UInt64} + 1), 6, '0'), '-',
           toString(bitShiftRight(h, 40) % 3 + 1)),
    ['llmapi', 'cohere', 'azure', 'bedrock'][bitShiftRight(h, 20) % 4 + 1],
    if(bitShiftRight(h, 24) % 8 = 0, 'rerank-3', 'rerank-4-pro'),
    ['global', 'global', 'us-east', 'us-west'][bitShiftRight(h, 20) % 4 + 1],
    if(number % 160 = 0, 'error', 'ok'),
    if(number % 160 = 0, 503, 200),
    if(number % 160 = 0, 'provider_5xx', ''),
    1,
    1 + bitShiftRight(h, 30) % 310,
    (1 + bitShiftRight(h, 30) % 310) * 230,
    0,
    (bitShiftRight(h, 12) % 30000) / 100.0,
    if(number % 50 = 0, [('cohere', 'rerank-4-pro', 'global', 2000.5, 'timeout', 504)], [])
FROM (SELECT number, cityHash64(number) AS h FROM numbers({n:UInt64}))
"""


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_backfill(path: Path, events: int, tenants: int, days: float) -> dict[str, Any]:
    from metering.clickhouse import migrations
    from metering.clickhouse.client import make_client
    from metering.db import migrations as relational_migrations
    from metering.db.engine import make_engine
    from metering.simulate.backfill import BackfillPlan, backfill

    ch = make_client(f"chdb://{path / 'clickhouse'}", "default")
    migrations.migrate(ch)
    engine = make_engine(f"sqlite:///{path / 'metering.db'}")
    relational_migrations.upgrade(engine)
    plan = BackfillPlan(days=days, events=events, tenants=tenants, seed=1, end=datetime.now(UTC))
    started = time.perf_counter()
    report = backfill(ch, engine, plan)
    seconds = time.perf_counter() - started
    stored = ch.query("SELECT count() FROM rerank_events").result_rows[0][0]
    return {
        "rows": events,
        "stored": int(stored),
        "seconds": seconds,
        "probes": report.probes,
        "tenants": report.tenants,
        "projects": report.projects,
        "timings": report.timings,
        "rss_mb": _rss_mb(),
    }


def phase_baseline(path: Path, events: int, tenants: int, days: float) -> dict[str, Any]:
    from metering.clickhouse import migrations
    from metering.clickhouse.client import make_client

    ch = make_client(f"chdb://{path / 'clickhouse'}", "default")
    migrations.migrate(ch)
    end_ms = int(time.time() * 1000)
    span_ms = int(days * 86_400_000)
    started = time.perf_counter()
    ch.command(
        BASELINE_SQL,
        parameters={
            "start_ms": end_ms - span_ms,
            "span_ms": span_ms,
            "n": events,
            "tenants": tenants,
        },
    )
    seconds = time.perf_counter() - started
    stored = ch.query("SELECT count() FROM rerank_events").result_rows[0][0]
    version = ch.query("SELECT version()").result_rows[0][0]
    return {
        "rows": events,
        "stored": int(stored),
        "seconds": seconds,
        "rss_mb": _rss_mb(),
        "engine_version": str(version),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=24_500_000)
    parser.add_argument("--tenants", type=int, default=210_000)
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--phase", choices=["backfill", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run = phase_backfill if args.phase == "backfill" else phase_baseline
        print(json.dumps(run(args.path, args.events, args.tenants, args.days)))
        return 0

    import chdb

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-backfill-") as tmp:
        for phase in ("backfill", "baseline"):
            path = Path(tmp) / phase
            path.mkdir()
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--phase",
                    phase,
                    "--path",
                    str(path),
                    "--events",
                    str(args.events),
                    "--tenants",
                    str(args.tenants),
                    "--days",
                    str(args.days),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    fill, base = results["backfill"], results["baseline"]
    assert fill["stored"] == base["stored"] == args.events, (fill["stored"], base["stored"])
    fill_rate = fill["rows"] / fill["seconds"]
    base_rate = base["rows"] / base["seconds"]
    t = fill["timings"]
    events_only = fill["rows"] / (t["stage"] + t["events"])
    print(
        f"chdb {chdb.__version__} (engine {base['engine_version']}), "
        f"{args.events:,} events, {args.tenants:,} tenants, {args.days:g} days"
    )
    print(
        f"backfill (everything): {fill['seconds']:.1f} s = {fill_rate:,.0f} events/s, "
        f"peak RSS {fill['rss_mb']:,.0f} MB; {fill['probes']:,} probes, "
        f"{fill['tenants']:,} tenants / {fill['projects']:,} projects registered"
    )
    print(
        "  phases (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
        + f"  -> stage + events insert alone: {events_only:,.0f} rows/s"
    )
    print(
        f"baseline INSERT ... SELECT FROM numbers(): {base['seconds']:.1f} s = "
        f"{base_rate:,.0f} rows/s, peak RSS {base['rss_mb']:,.0f} MB"
    )
    print(
        f"ratio backfill / baseline: {fill_rate / base_rate:.2f} (everything), "
        f"{events_only / base_rate:.2f} (events table alone)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
