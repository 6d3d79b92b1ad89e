"""The report of a bench/ingest.py run: the figures table, the targets, the header that
says what ran where (command, machine, commit), and appending it to bench/RESULTS.md.

`render` only computes and formats what `bench.ingest.run` measured, so the wording of
bench/RESULTS.md lives in one place.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.ingest_server import CYCLE_SECONDS, CYCLES, FAILURES

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Ingest over HTTP (bench/ingest.py)"
BATCH = 1_000  # events per request body (the report's wording says 1,000)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def interval_rates(done_at: list[float], start: float, width: float = 5.0) -> list[float]:
    """Events/s of each full `width`-second window of the run."""
    if not done_at:
        return []
    buckets: dict[int, int] = {}
    for t in done_at:
        bucket = int((t - start) // width)
        buckets[bucket] = buckets.get(bucket, 0) + BATCH
    last_full = int((max(done_at) - start) // width) - 1
    return [buckets.get(b, 0) / width for b in range(0, last_full + 1)]


def code_version() -> str:
    """The commit the server ran, and whether metering/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "metering", "migrations"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"
    return f"{commit}{' + uncommitted changes in metering/' if dirty else ''}"


def machine() -> dict[str, str]:
    mem_kib = proc_status_kib_meminfo()
    import chdb
    import clickhouse_connect

    return {
        "nproc": str(os.cpu_count()),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "chdb": getattr(chdb, "__version__", "?"),
        "clickhouse-connect": getattr(clickhouse_connect, "__version__", "?"),
    }


def proc_status_kib_meminfo() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def append_results(path: Path, block: str) -> None:
    """Add `block` at the end of this benchmark's section (created if missing), leaving
    every other section as it is."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION not in text:
        path.write_text(text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n")
        return
    start = text.index(SECTION) + len(SECTION)
    following = re.search(r"^## ", text[start:], flags=re.MULTILINE)
    end = start + following.start() if following else len(text)
    before, after = text[:end].rstrip("\n"), text[end:]
    path.write_text(f"{before}\n\n{block}\n" + (f"\n{after}" if after else ""))


@dataclass
class Measured:
    """What one run did and measured (`bench.ingest.run`), for `render`."""

    command: str  # as typed, for the header ("" when called with an argv)
    version: str  # code_version() before the run
    extra_env: dict[str, str]  # --env
    row_bytes: float  # mean JSON bytes per event
    result: loadgen.LoadResult  # the timed HTTP load
    stored_at: float | None  # perf_counter once every accepted row was stored; None: never
    server_cpu: float  # server CPU seconds during the load
    server_threads: dict[str, float]  # the same per thread name
    own_cpu: float  # this process's CPU seconds during the load
    machine_busy: float  # every process's CPU seconds during the load
    hwm_kib: int  # server VmHWM at the end
    peak_rss_kib: int  # sampled VmRSS peak
    peak_spool_bytes: float  # sampled spool backlog peak
    final_metrics: dict[str, float]  # /metrics once everything was stored
    counts: dict[str, int]  # count_stored() after the server stopped
    exit_code: int  # the server's, after SIGTERM
    engine: dict[str, Any] | None  # the engine worker's figures; None with --skip-engine


def render(args: argparse.Namespace, m: Measured) -> tuple[str, bool]:
    """The run's markdown block (as bench/RESULTS.md keeps it) and its verdict."""
    result, engine, counts = m.result, m.engine, m.counts
    http_rate = result.accepted / result.seconds
    stored_rate = result.accepted / (m.stored_at - result.started) if m.stored_at else float("nan")
    windows = interval_rates(result.done_at, result.started)
    server_cores = m.server_cpu / result.seconds
    own_cpu = m.own_cpu
    engine_rate = engine["rows"] / engine["rows_seconds"] if engine else float("nan")
    stock_rate = engine["rows"] / engine["stock_seconds"] if engine else float("nan")
    own_rate = engine["rows"] / engine["engine_seconds"] if engine else float("nan")
    engine_ids_rate = (
        engine["rows"] / (engine["rows_seconds"] + engine["ids_seconds"])
        if engine
        else float("nan")
    )
    others_cores = max(0.0, (m.machine_busy - m.server_cpu - own_cpu) / result.seconds)
    ratio = http_rate / engine_rate if engine else float("nan")
    own_ratio = http_rate / own_rate if engine else float("nan")
    by_thread = sorted(
        ((sec, name) for name, sec in m.server_threads.items() if sec >= 0.01 * result.seconds),
        reverse=True,
    )
    thread_note = ", ".join(f"{name} {sec / result.seconds:.2f}" for sec, name in by_thread)
    lat_ms = [x * 1000 for x in result.latencies]
    ok = (
        not result.failures
        and result.accepted == args.events
        and counts["rows"] == counts["distinct"] == args.events
        and counts["ids_distinct"] == args.events
        and (engine is None or engine["rows"] == args.events)
    )
    hwm_kib = m.hwm_kib
    failures_metric = m.final_metrics.get(FAILURES, 0.0)
    cycles = m.final_metrics.get(CYCLES, 0.0)
    cycle_seconds = m.final_metrics.get(CYCLE_SECONDS, 0.0)
    mach = machine()
    if engine:
        mach["clickhouse"] = engine["clickhouse_version"]
    figures = [
        ("events sent / accepted (202)", f"{args.events:,} / {result.accepted:,}"),
        ("bad replies (not 202 with accepted == 1000)", f"{len(result.failures)}"),
        ("HTTP wall time", f"{result.seconds:.1f} s"),
        ("**events/s over HTTP (accepted, 202)**", f"**{http_rate:,.0f}**"),
        (
            "events/s per 5-s window min / median / max",
            " / ".join(
                f"{x:,.0f}" for x in (min(windows), statistics.median(windows), max(windows))
            )
            if windows
            else "n/a",
        ),
        ("events/s until all stored in ClickHouse", f"{stored_rate:,.0f}"),
        (
            "**events/s client-path ceiling** (the writer's raw_insert JSONEachRow, "
            f"streamed into chDB, {args.engine_chunk:,}-row chunks)",
            f"**{engine_rate:,.0f}**",
        ),
        (
            "events/s stock driver (clickhouse-connect chDB: temp file, then INFILE)",
            f"{stock_rate:,.0f}",
        ),
        (
            "**events/s engine's own insert** (INSERT ... FROM INFILE, same chunks)",
            f"**{own_rate:,.0f}**",
        ),
        (
            "insert time per 1M rows: client path / stock driver / engine's own",
            " / ".join(
                f"{1e6 * engine[k] / engine['rows']:.2f} s" if engine else "n/a"
                for k in ("rows_seconds", "stock_seconds", "engine_seconds")
            ),
        ),
        ("client path incl. `ingested_ids` insert", f"{engine_ids_rate:,.0f}"),
        ("**ratio HTTP / client-path ceiling**", f"**{ratio:.2f}**"),
        ("**ratio HTTP / engine's own insert**", f"**{own_ratio:.2f}**"),
        (
            "**server peak RSS** (VmHWM; sampled VmRSS peak)",
            f"**{hwm_kib / 1024:,.0f} MiB**; {m.peak_rss_kib / 1024:,.0f} MiB",
        ),
        (
            "request latency p50 / p99 / max",
            f"{percentile(lat_ms, 0.5):.1f} / {percentile(lat_ms, 0.99):.1f} / "
            f"{max(lat_ms):.1f} ms",
        ),
        ("server CPU during the run", f"{server_cores:.2f} cores"),
        ("server CPU by thread (cores; ≥ 0.01 shown)", thread_note),
        ("load generator CPU during the run", f"{own_cpu / result.seconds:.2f} cores"),
        ("other processes' CPU during the run (shared machine)", f"{others_cores:.2f} cores"),
        (
            "peak spool backlog (not yet in ClickHouse)",
            f"{m.peak_spool_bytes / 2**20:,.0f} MiB",
        ),
        ("writer store failures (metric)", f"{failures_metric:.0f}"),
        (
            "writer cycles (ClickHouse inserts of rows + ids), avg rows and ms per cycle",
            f"{cycles:,.0f}, {result.accepted / max(cycles, 1):,.0f} rows, "
            f"{1000 * cycle_seconds / max(cycles, 1):.0f} ms",
        ),
        (
            "stored after stop: rows / uniqExact(event_id) / ingested_ids",
            f"{counts['rows']:,} / {counts['distinct']:,} / {counts['ids_distinct']:,}",
        ),
        ("active parts in rerank_events at the end", f"{counts['active_parts']}"),
        ("server exit code (SIGTERM)", f"{m.exit_code}"),
        ("verdict (every reply good, stored == sent exactly once)", "PASS" if ok else "FAIL"),
    ]
    targets = [
        ("≥ 150,000 events/s end to end", http_rate >= 150_000),
        ("≥ 0.37 of the client-path ceiling (the figure before)", ratio >= 0.37),
        ("≥ 0.35 of the engine's own insert (goal)", own_ratio >= 0.35),
        ("server RSS < 1.5 GB", hwm_kib * 1024 < 1.5e9),
    ]
    table = "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in figures)
    target_lines = "\n".join(f"- {name}: {'met' if met else 'MISSED'}" for name, met in targets)
    variant = f"Variant: {args.note}  \n" if args.note else ""
    env_note = ", ".join(f"{k}={v}" for k, v in m.extra_env.items()) or "none (defaults)"
    block = (
        f"### Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Command: `cd /work/main && /tmp/venv/bin/{m.command.strip()}`  \n"
        f"Machine: {mach['nproc']} cores ({mach['cpu']}), {mach['memory']} RAM, "
        f"kernel {mach['kernel']}, Python {mach['python']}, chdb {mach['chdb']} "
        f"(ClickHouse {mach.get('clickhouse', '?')}), clickhouse-connect "
        f"{mach['clickhouse-connect']}  \n"
        f"Code: {m.version}  \n"
        f"{variant}"
        f"Setup: {args.events:,} distinct events ({m.row_bytes:.0f} B JSON each) in 1,000-event "
        f"JSON bodies, {args.concurrency} keep-alive connections on loopback, auth "
        f"{'ingest API key' if args.auth == 'key' else 'admin token'}, server on a fresh "
        f"data dir (chDB + SQLite), METERING_SPOOL_FSYNC=always; extra server env: "
        f"{env_note}. Load generator and server share the machine.\n\n"
        f"{table}\n\nTargets:\n{target_lines}\n"
    )
    return block, ok
