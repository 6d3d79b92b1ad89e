"""End-to-end ingest benchmark: events/s over HTTP against a real `metering serve`.

    cd /work/main && /tmp/venv/bin/python -m bench.ingest [--events 4000000]
        [--concurrency 4] [--auth key|admin] [--env METERING_X=Y ...]
        [--profile /tmp/ingest.txt] [--results bench/RESULTS.md]

One run does, in order:

1. builds N distinct, realistic events (~360 bytes each) and wraps them in 1,000-event
   JSON bodies, all before the clock starts (bench/loadgen.py);
2. starts `metering serve` on a fresh temp data dir with the defaults (exactly-once
   gate, spool with METERING_SPOOL_FSYNC=always), creates an ingest key;
3. sends every body once over a few keep-alive connections (raw asyncio HTTP/1.1) and
   checks each reply is 202 with accepted == 1000; meanwhile samples the server's RSS
   (/proc/PID/status) and CPU, and polls /metrics for rows stored in ClickHouse;
4. waits until the writer has stored every row, stops the server (SIGTERM), and counts
   `rerank_events` and `ingested_ids` in a subprocess: both must equal N;
5. measures the engine ceiling in a subprocess on its own chDB path, three ways, each
   with the same NDJSON rows (rebuilt from the same seed, checked by digest) in the same
   large chunks into a fresh, identical `rerank_events`:
   - the client path: `raw_insert(..., fmt="JSONEachRow")` through the service's own
     client (metering.clickhouse.client: the payload streams into chDB, no temp file),
     the path the writer takes;
   - the stock driver: clickhouse-connect's chDB backend as shipped, which writes each
     payload to a temporary file first and inserts it `FROM INFILE` (what the writer
     did before; the difference is what that extra write costs);
   - the engine's own insert: `INSERT INTO ... FROM INFILE 'chunk.json' FORMAT
     JSONEachRow`, one statement per chunk, the files written before the clock starts;
6. prints a table and, with --results, appends it to bench/RESULTS.md.

The server is the only store owner: chDB allows one data path per process and one
process per path, so counts and the engine run are separate processes.

This module is the command line and the run's order; the parts live next to it:
bench/ingest_server.py (the server subprocess, its HTTP calls and /metrics),
bench/ingest_sampling.py (/proc: RSS, CPU per thread, how busy the machine is),
bench/ingest_chdb.py (the stored-row count and the engine ceiling, each in a subprocess),
bench/ingest_report.py (the figures, the targets, appending to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.authorize_setup import budgets_for_lines, post_budgets, post_prices
from bench.ingest_chdb import count_stored, engine_worker, run_engine
from bench.ingest_report import BATCH, Measured, append_results, code_version, render
from bench.ingest_sampling import (
    Sampler,
    machine_busy_seconds,
    proc_cpu_seconds,
    proc_status_kib,
    thread_cpu_seconds,
    wait_for_quiet,
)
from bench.ingest_server import STORED, Server, free_port, http, metric_values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=4_000_000, help="events in the run")
    parser.add_argument("--concurrency", type=int, default=4, help="keep-alive connections")
    parser.add_argument(
        "--auth",
        choices=["key", "admin"],
        default="key",
        help="send with an ingest API key (default, as a gateway) or the admin token",
    )
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument(
        "--budgets-fraction",
        type=float,
        default=0.0,
        help="before the timed run, post the price book and budgets on this fraction of "
        "the run's tenants (bench/authorize_setup.py), so that budgets are on (0: none)",
    )
    parser.add_argument("--run-id", default=None, help="event id prefix (default: random)")
    parser.add_argument(
        "--engine-chunk",
        type=int,
        default=200_000,
        help="rows per raw_insert in the engine run (the writer's max batch)",
    )
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=300.0,
        help="wait up to this many seconds for other work on the machine to "
        "stop before the run (0: don't wait)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="METERING_X=Y",
        help="extra server environment (e.g. METERING_SPOOL_FSYNC=never)",
    )
    parser.add_argument(
        "--server-cmd",
        default="",
        help="command run instead of `metering` (then `serve --port P`), "
        "e.g. a wrapper script that tunes the interpreter first",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy record the server during the load (raw collapsed stacks)",
    )
    parser.add_argument(
        "--profile-args",
        default="",
        help='extra py-spy record options, e.g. "--gil" or "--idle --native"',
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="append the figures to this markdown file (bench/RESULTS.md)",
    )
    parser.add_argument(
        "--note", default="", help="a line saying what this run varies (goes into the results)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir")
    parser.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-epoch", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--digest", default="", help=argparse.SUPPRESS)
    parser.add_argument("--engine-path", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.events % BATCH:
        parser.error(f"--events must be a multiple of {BATCH}")
    if args.run_id is None:
        args.run_id = os.urandom(4).hex()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine_worker:
        return engine_worker(args)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        return run(args, work, argv)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, argv: list[str] | None) -> int:
    """The whole benchmark (see the module docstring); `work` is a fresh temp dir."""
    command = "python -m bench.ingest " + shlex.join(sys.argv[1:]) if argv is None else ""
    extra_env = dict(item.split("=", 1) for item in args.env)

    # 1. Bodies, before any clock starts.
    began = time.perf_counter()
    base_epoch = float(int(time.time()) - 900)  # the run's events span 10 min, ending 5 min ago
    lines = loadgen.build_lines(
        args.events, seed=args.seed, run_id=args.run_id, base_epoch=base_epoch
    )
    digest = loadgen.digest(lines)
    row_bytes = sum(len(line) for line in lines) / len(lines)
    bodies = [loadgen.json_body(chunk) for chunk in loadgen.batches(lines, BATCH)]
    budgets = (
        budgets_for_lines(lines, args.budgets_fraction, args.seed)
        if args.budgets_fraction > 0
        else (0, [])
    )
    del lines
    print(
        f"built {args.events:,} events in {len(bodies):,} bodies "
        f"({row_bytes:.0f} B/event, {sum(map(len, bodies)) / 2**20:,.0f} MiB) "
        f"in {time.perf_counter() - began:.1f}s",
        flush=True,
    )

    version = code_version()
    if args.wait_quiet > 0:
        busy = wait_for_quiet(args.wait_quiet)
        print(f"machine: {busy:.2f} cores busy with other work before the run", flush=True)
    admin = "bench-admin-" + os.urandom(8).hex()
    server = Server(work / "data", free_port(), admin, extra_env, args.server_cmd.split())
    profiler: subprocess.Popen[bytes] | None = None
    try:
        ready_s = server.start()
        token = admin
        if args.auth == "key":
            status, body = http(
                "POST",
                f"{server.base}/v1/api-keys",
                token=admin,
                body={"scopes": ["ingest"], "name": "bench"},
            )
            if status != 201:
                raise RuntimeError(f"creating an ingest key: {status} {body!r}")
            token = json.loads(body)["key"]
        if budgets[1]:
            posted = time.perf_counter()
            post_prices(server.base, admin)
            post_budgets(server.base, admin, budgets[1])
            print(
                f"budgets on: {len(budgets[1]):,} budgets on {args.budgets_fraction:.0%} of "
                f"{budgets[0]:,} tenants, posted in {time.perf_counter() - posted:.1f}s",
                flush=True,
            )
        requests = [loadgen.post_request("127.0.0.1", server.port, token, b) for b in bodies]
        del bodies
        print(
            f"server pid {server.pid} ready in {ready_s:.1f}s on port {server.port}; "
            f"sending with {args.concurrency} connections ...",
            flush=True,
        )

        # 2. The timed run.
        sampler = Sampler(server.pid, server.base)
        sampler.start()
        if args.profile is not None:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            profiler = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "100",
                    "--threads",
                    "--nonblocking",
                    *args.profile_args.split(),
                    "--output",
                    str(args.profile),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        busy_before = machine_busy_seconds()
        threads_before = thread_cpu_seconds(server.pid)
        cpu_before = proc_cpu_seconds(server.pid)
        own_before = os.times()
        loop = loadgen.new_event_loop()
        try:
            result = loop.run_until_complete(
                loadgen.run_load(
                    "127.0.0.1",
                    server.port,
                    requests,
                    expect_accepted=[BATCH] * len(requests),
                    concurrency=args.concurrency,
                )
            )
        finally:
            loop.close()
        cpu_after = proc_cpu_seconds(server.pid)
        threads_after = thread_cpu_seconds(server.pid)
        own_after = os.times()
        busy_after = machine_busy_seconds()
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(60)
        # 3. Until the writer has put every accepted row into ClickHouse.
        stored_deadline = time.perf_counter() + 600
        stored_at = None
        while time.perf_counter() < stored_deadline:
            values = metric_values(server.base)
            if values.get(STORED, 0.0) >= result.accepted:
                stored_at = time.perf_counter()
                break
            time.sleep(0.1)
        sampler.stop()
        hwm_kib = proc_status_kib(server.pid, "VmHWM")
        final_metrics = metric_values(server.base)
        requests.clear()
        exit_code = server.stop()
        counts = count_stored(work / "data" / "clickhouse")
    finally:
        if profiler is not None and profiler.poll() is None:
            profiler.kill()
        server.kill()

    engine: dict[str, Any] | None = None
    if not args.skip_engine:
        print("engine ceiling run ...", flush=True)
        engine = run_engine(args, base_epoch, digest, work)

    # 4. Figures.
    measured = Measured(
        command=command,
        version=version,
        extra_env=extra_env,
        row_bytes=row_bytes,
        result=result,
        stored_at=stored_at,
        server_cpu=cpu_after - cpu_before,
        server_threads={
            name: after - threads_before.get(name, 0.0) for name, after in threads_after.items()
        },
        own_cpu=(own_after.user + own_after.system) - (own_before.user + own_before.system),
        machine_busy=busy_after - busy_before,
        hwm_kib=hwm_kib,
        peak_rss_kib=sampler.peak_rss_kib,
        peak_spool_bytes=sampler.peak_spool_bytes,
        final_metrics=final_metrics,
        counts=counts,
        exit_code=exit_code,
        engine=engine,
    )
    block, ok = render(args, measured)
    print()
    print(block)
    for failure in result.failures[:10]:
        print("  failure:", failure)
    if args.results is not None:
        append_results(args.results, block)
        print(f"appended to {args.results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
