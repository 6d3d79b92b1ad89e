"""What each projection of `rerank_events` costs the engine's own insert.

    cd /work/main && .venv/bin/python -m bench.projections [--events 500000] [--rounds 3]
        [--chunk 10000] [--results bench/RESULTS.md] [--note "..."]

One process, one scratch chDB path. The table is made by the migrations (every
projection), then copied with one projection fewer at a time, and once with none. The
same NDJSON rows (bench/loadgen.py, written to chunk files before any clock starts) are
inserted into each copy with the engine's own `INSERT ... FROM INFILE ... FORMAT
JSONEachRow`, one statement per chunk, the copies taken in turn within each round
(interleaved, so a busy moment of the machine falls on all of them), the table truncated
after each; a first round warms up and is not counted. The baseline is the copy without
projections in the same run; each figure is its median over the rounds, as a ratio to
that baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import loadgen
from bench.ingest_report import code_version

PROJECTIONS = ("p_hourly", "p_hourly_tenants", "p_daily_tenants", "p_by_time", "p_tenant_hourly")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=10_000, help="rows per INSERT")
    parser.add_argument("--tenants", type=int, default=210_000)
    parser.add_argument("--results", default="")
    parser.add_argument("--note", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from metering.clickhouse import migrations
    from metering.clickhouse.client import make_client
    from metering.ingest.store import EVENTS_TABLE

    work = Path(tempfile.mkdtemp(prefix="bench-projections-"))
    try:
        lines = loadgen.build_lines(args.events, seed=7, run_id="proj", base_epoch=time.time())
        chunks = []
        for number, start in enumerate(range(0, len(lines), args.chunk)):
            chunk_file = work / f"chunk-{number}.json"
            chunk_file.write_bytes(loadgen.ndjson(lines[start : start + args.chunk]))
            chunks.append(chunk_file)
        client = make_client(f"chdb://{work / 'ch'}", "default")
        migrations.migrate(client)
        version = client.query("SELECT version()").result_rows[0][0]
        variants: dict[str, str] = {"every projection": "rerank_events"}
        for name in PROJECTIONS:
            table = f"ev_without_{name}"
            client.command(f"CREATE TABLE {table} AS rerank_events")
            client.command(f"ALTER TABLE {table} DROP PROJECTION IF EXISTS {name}")
            variants[f"without {name}"] = table
        client.command("CREATE TABLE ev_none AS rerank_events")
        for name in PROJECTIONS:
            client.command(f"ALTER TABLE ev_none DROP PROJECTION IF EXISTS {name}")
        variants["no projection (baseline)"] = "ev_none"
        columns = ", ".join(EVENTS_TABLE.columns)
        rates: dict[str, list[float]] = {label: [] for label in variants}
        load_before = os.getloadavg()
        for round_number in range(args.rounds + 1):  # round 0 warms up, not counted
            for label, table in variants.items():
                started = time.perf_counter()
                for chunk_file in chunks:
                    client.command(
                        f"INSERT INTO {table} ({columns}) FROM INFILE '{chunk_file}'"
                        " FORMAT JSONEachRow"
                    )
                if round_number:
                    rates[label].append(len(lines) / (time.perf_counter() - started))
                stored = client.query(f"SELECT count() FROM {table}").result_rows[0][0]
                assert stored == len(lines), (table, stored)
                client.command(f"TRUNCATE TABLE {table}")
        load_after = os.getloadavg()
        base = statistics.median(rates["no projection (baseline)"])
        every = statistics.median(rates["every projection"])
        rows = []
        for label, values in rates.items():
            median = statistics.median(values)
            # A projection's share: how much faster the insert is without it, relative
            # to the insert with every projection.
            share = "" if label.startswith(("every", "no ")) else f"{every / median:.2f}"
            rows.append(
                f"| {label} | {median:,.0f} | {median / base:.2f} | {share} |"
                f" {', '.join(f'{v:,.0f}' for v in values)} |"
            )
        report = "\n".join(
            [
                f"### bench/projections.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                "",
                f"Command: `python -m bench.projections --events {args.events} --rounds"
                f" {args.rounds} --chunk {args.chunk}`  ",
                f"Machine: nproc {os.cpu_count()}, Python {platform.python_version()},"
                f" chDB engine {version}, load {load_before[0]:.2f} before /"
                f" {load_after[0]:.2f} after; code {code_version()}  ",
                *([f"Note: {args.note}  "] if args.note else []),
                f"Rows: {len(lines):,} loadgen events in {len(chunks)} INSERT ... FROM INFILE"
                " statements per table per round; tables truncated between rounds.",
                "",
                "| table | rows/s (median) | ratio to no projection | every projection /"
                " without this one | per round |",
                "|---|---|---|---|---|",
                *rows,
                "",
                "Reading: `every projection / without this one` below 1.00 is the share of"
                " the insert's time that projection costs (0.80: dropping it would make"
                " inserts 1/0.80 = 1.25x faster).",
                "",
            ]
        )
        print(report)
        if args.results:
            with open(args.results, "a", encoding="utf-8") as out:
                out.write("\n" + report)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
