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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import loadgen

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Ingest over HTTP (bench/ingest.py)"
BATCH = 1_000


# ---------------------------------------------------------------------------------------
# The server subprocess.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Server:
    data_dir: Path
    port: int
    admin_token: str
    extra_env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)  # replaces `metering` when given
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start `metering serve`; return seconds until /readyz said 200."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        env.update(
            METERING_DATA_DIR=str(self.data_dir),
            METERING_ADMIN_TOKEN=self.admin_token,
            METERING_SPOOL_FSYNC="always",
        )
        env.update(self.extra_env)
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        metering = Path(sys.executable).with_name("metering")
        command = [str(metering)] if metering.exists() else [sys.executable, "-m", "metering.cli"]
        command = self.command or command
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, "serve", "--port", str(self.port)],
                cwd=self.data_dir.parent,  # no stray .env from the caller's directory
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, _ = http("GET", f"{self.base}/readyz", timeout=2)
                if status == 200:
                    return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM (graceful: the writer drains the spool), SIGKILL past `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def metric_values(base: str) -> dict[str, float]:
    """The service's Prometheus samples, `name{labels}` -> value."""
    _, text = http("GET", f"{base}/metrics", timeout=10)
    values: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


STORED = 'metering_clickhouse_rows_stored_total{stream="events"}'
SPOOL = 'metering_spool_pending_bytes{stream="events"}'
FAILURES = 'metering_clickhouse_store_failures_total{stream="events"}'
CYCLES = 'metering_clickhouse_store_seconds_count{stream="events"}'
CYCLE_SECONDS = 'metering_clickhouse_store_seconds_sum{stream="events"}'


# ---------------------------------------------------------------------------------------
# Sampling the server process.

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat(5); [2] above starts at field 3.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used since boot (from /proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


def wait_for_quiet(max_wait: float, busy_limit: float = 0.3, probe: float = 3.0) -> float:
    """Wait (up to `max_wait` s) until the machine's other work uses < `busy_limit`
    cores over `probe` seconds: this machine is shared. Return the cores last seen busy."""
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_busy_seconds()
        time.sleep(probe)
        busy = (machine_busy_seconds() - before) / probe
        if busy < busy_limit or time.monotonic() > deadline:
            return busy
        print(f"  machine busy ({busy:.2f} cores used by others), waiting ...", flush=True)


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (threads with a number in the name,
    like ClickHouse's pools, are grouped by the name without it)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = re.sub(r"\d+", "#", (task / "comm").read_text().strip())
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return out


class Sampler(threading.Thread):
    """Peak VmRSS of the server, and the writer's progress from /metrics."""

    def __init__(self, pid: int, base: str, interval: float = 0.1) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid = pid
        self.base = base
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_spool_bytes = 0.0
        self.stored: list[tuple[float, float]] = []  # (perf_counter, rows stored)
        self._halt = threading.Event()

    def run(self) -> None:
        ticks = 0
        while not self._halt.is_set():
            try:
                self.peak_rss_kib = max(self.peak_rss_kib, proc_status_kib(self.pid, "VmRSS"))
                if ticks % 5 == 0:
                    values = metric_values(self.base)
                    self.stored.append((time.perf_counter(), values.get(STORED, 0.0)))
                    self.peak_spool_bytes = max(self.peak_spool_bytes, values.get(SPOOL, 0.0))
            except (OSError, ValueError):
                pass
            ticks += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# ---------------------------------------------------------------------------------------
# Subprocess work on chDB paths (one path per process, one process per path).

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


# ---------------------------------------------------------------------------------------
# Reporting.


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


# ---------------------------------------------------------------------------------------
# The run.


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
        failures_metric = final_metrics.get(FAILURES, 0.0)
        cycles = final_metrics.get(CYCLES, 0.0)
        cycle_seconds = final_metrics.get(CYCLE_SECONDS, 0.0)
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
    http_rate = result.accepted / result.seconds
    stored_rate = result.accepted / (stored_at - result.started) if stored_at else float("nan")
    windows = interval_rates(result.done_at, result.started)
    server_cores = (cpu_after - cpu_before) / result.seconds
    own_cpu = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    engine_rate = engine["rows"] / engine["rows_seconds"] if engine else float("nan")
    stock_rate = engine["rows"] / engine["stock_seconds"] if engine else float("nan")
    own_rate = engine["rows"] / engine["engine_seconds"] if engine else float("nan")
    engine_ids_rate = (
        engine["rows"] / (engine["rows_seconds"] + engine["ids_seconds"])
        if engine
        else float("nan")
    )
    others_cores = max(
        0.0, (busy_after - busy_before - (cpu_after - cpu_before) - own_cpu) / result.seconds
    )
    ratio = http_rate / engine_rate if engine else float("nan")
    own_ratio = http_rate / own_rate if engine else float("nan")
    by_thread = sorted(
        (
            (after - threads_before.get(name, 0.0), name)
            for name, after in threads_after.items()
            if after - threads_before.get(name, 0.0) >= 0.01 * result.seconds
        ),
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
            f"**{hwm_kib / 1024:,.0f} MiB**; {sampler.peak_rss_kib / 1024:,.0f} MiB",
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
            f"{sampler.peak_spool_bytes / 2**20:,.0f} MiB",
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
        ("server exit code (SIGTERM)", f"{exit_code}"),
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
    env_note = ", ".join(f"{k}={v}" for k, v in extra_env.items()) or "none (defaults)"
    block = (
        f"### Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Command: `cd /work/main && /tmp/venv/bin/{command.strip()}`  \n"
        f"Machine: {mach['nproc']} cores ({mach['cpu']}), {mach['memory']} RAM, "
        f"kernel {mach['kernel']}, Python {mach['python']}, chdb {mach['chdb']} "
        f"(ClickHouse {mach.get('clickhouse', '?')}), clickhouse-connect "
        f"{mach['clickhouse-connect']}  \n"
        f"Code: {version}  \n"
        f"{variant}"
        f"Setup: {args.events:,} distinct events ({row_bytes:.0f} B JSON each) in 1,000-event "
        f"JSON bodies, {args.concurrency} keep-alive connections on loopback, auth "
        f"{'ingest API key' if args.auth == 'key' else 'admin token'}, server on a fresh "
        f"data dir (chDB + SQLite), METERING_SPOOL_FSYNC=always; extra server env: "
        f"{env_note}. Load generator and server share the machine.\n\n"
        f"{table}\n\nTargets:\n{target_lines}\n"
    )
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
