"""The work a bench/ingest.py run does on chDB paths, each in its own process (chDB allows
one data path per process and one process per path, and the server owns its own path):
counting what the server stored, and measuring the engine ceiling the run is compared to.

The engine worker runs as `python -m bench.ingest --engine-worker ...` (hidden options),
so the whole benchmark keeps one command line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import loadgen

REPO = Path(__file__).resolve().parents[1]

COUNT_SCRIPT = """
import json, sys
from metering.clickhouse.client import make_client
c = make_client("chdb://" + sys.argv[1], "default")
events = c.query("SELECT count(), uniqExact(event_id) FROM rerank_events").result_rows[0]
ids = c.query(
    "SELECT count(), uniqExact(id) FROM ingested_ids WHERE stream = 'events'"
).result_rows[0]
parts = c.query(
    "SELECT count() FROM system.parts WHERE active AND table = 'rerank_events'"
).result_rows[0][0]
print(json.dumps({"rows": events[0], "distinct": events[1], "ids_rows": ids[0],
                  "ids_distinct": ids[1], "active_parts": parts}))
"""


def count_stored(clickhouse_path: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", COUNT_SCRIPT, str(clickhouse_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def engine_worker(args: argparse.Namespace) -> int:
    """(subprocess) insert the run's rows into a fresh rerank_events three ways (the
    client path, the stock driver, the engine's own INFILE insert); print JSON."""
    import clickhouse_connect

    from metering.clickhouse import migrations
    from metering.clickhouse.client import QUERY_SETTINGS, make_client
    from metering.ingest.store import EVENTS_TABLE

    lines = loadgen.build_lines(
        args.events, seed=args.seed, run_id=args.run_id, base_epoch=args.base_epoch
    )
    fingerprint = loadgen.digest(lines)
    if fingerprint != args.digest:
        print(json.dumps({"error": f"rows differ: {fingerprint} != {args.digest}"}))
        return 1
    path = Path(args.engine_path)
    client = make_client(f"chdb://{path}", "default")
    stock = clickhouse_connect.get_client(dsn=f"chdb://{path}", settings=QUERY_SETTINGS)
    migrations.migrate(client)
    version = client.query("SELECT version()").result_rows[0][0]
    columns = EVENTS_TABLE.columns  # as the writer inserts them
    column_list = ", ".join(columns)
    chunk = args.engine_chunk
    chunk_files: list[Path] = []
    for number, start in enumerate(range(0, len(lines), chunk)):
        chunk_file = path.parent / f"engine-chunk-{number}.json"
        chunk_file.write_bytes(loadgen.ndjson(lines[start : start + chunk]))
        chunk_files.append(chunk_file)

    def rows_path(name: str) -> float:
        client.command("TRUNCATE TABLE rerank_events")
        seconds = 0.0
        for chunk_file in chunk_files:
            payload = chunk_file.read_bytes() if name != "engine" else b""
            began = time.perf_counter()
            if name == "client":
                client.raw_insert("rerank_events", columns, payload, fmt="JSONEachRow")
            elif name == "stock":
                stock.raw_insert("rerank_events", columns, payload, fmt="JSONEachRow")
            else:
                client.command(
                    f"INSERT INTO rerank_events ({column_list}) FROM INFILE '{chunk_file}'"
                    " FORMAT JSONEachRow"
                )
            seconds += time.perf_counter() - began
        return seconds

    # Stock and engine first, the client path last: it leaves the rows for the count.
    stock_seconds = rows_path("stock")
    engine_seconds = rows_path("engine")
    rows_seconds = rows_path("client")
    ids_seconds = 0.0
    for start in range(0, len(lines), chunk):
        ids = [f"evt_{args.run_id}_{n:09d}" for n in range(start, min(start + chunk, len(lines)))]
        began = time.perf_counter()
        client.insert(
            "ingested_ids",
            [["events"] * len(ids), ids],
            column_names=["stream", "id"],
            column_oriented=True,
        )
        ids_seconds += time.perf_counter() - began
    stored = client.query("SELECT count(), uniqExact(event_id) FROM rerank_events").result_rows[0]
    print(
        json.dumps(
            {
                "rows": stored[0],
                "distinct": stored[1],
                "rows_seconds": rows_seconds,
                "stock_seconds": stock_seconds,
                "engine_seconds": engine_seconds,
                "ids_seconds": ids_seconds,
                "clickhouse_version": version,
            }
        )
    )
    return 0


def run_engine(args: argparse.Namespace, base_epoch: float, digest: str, work: Path) -> Any:
    command = [
        sys.executable,
        "-m",
        "bench.ingest",
        "--engine-worker",
        "--events",
        str(args.events),
        "--seed",
        str(args.seed),
        "--run-id",
        args.run_id,
        "--base-epoch",
        repr(base_epoch),
        "--digest",
        digest,
        "--engine-chunk",
        str(args.engine_chunk),
        "--engine-path",
        str(work / "engine-clickhouse"),
    ]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"engine worker failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
