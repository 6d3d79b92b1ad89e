"""The HTTP parts of bench/authorize.py: the `metering serve` under test and its set-up,
the open-loop runs, the ingest worker of the mixed runs, and the in-process ASGI figure.

`run_http` returns the figures as a dict; bench/authorize.py renders them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.authorize_load import OpenLoopResult, get_request, json_post, run_open_loop
from bench.authorize_setup import (
    Universe,
    insert_budgets,
    now_utc,
    post_prices,
    seed_lines,
    universe,
)
from bench.ingest_report import percentile
from bench.ingest_sampling import (
    proc_cpu_seconds,
    proc_status_kib,
    steal_seconds,
    wait_for_quiet,
)
from bench.ingest_server import STORED, Server, free_port, http, metric_values

REPO = Path(__file__).resolve().parents[1]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def authorize_bodies(u: Universe, count: int, seed: int) -> list[bytes]:
    """POST /v1/authorize bodies: tenants at random, half budgeted; a project (one of
    the tenant's) 70% of the time."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        account = rng.choice(u.budgeted if n % 2 == 0 and u.budgeted else u.unbudgeted)
        project = rng.choice(account.projects) if rng.random() < 0.7 else None
        out.append(json.dumps({"tenant_id": account.tenant, "project_id": project}).encode())
    return out


def wait_stored(base: str, count: float, timeout: float = 600.0) -> None:
    """Until this server process has stored `count` rows (its counter starts at 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric_values(base).get(STORED, 0.0) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {count} rows stored after {timeout}s")


RESYNCS = "metering_budget_resync_seconds_count"
RESYNC_SECONDS = "metering_budget_resync_seconds_sum"
ALERTS = "metering_budget_alerts_fired_total"


def wait_settled(server: Server, timeout: float = 600.0) -> float:
    """After a start: until the start-up work is over (the first minute's reconciliation
    has run, no alert fired for 5 s, the server below 0.15 cores for 2 s). The start-up
    storm (alerts the loaded budgets' spend crosses, the first forecasts of every scope,
    tenant registration) is a one-off; the runs measure the steady state after it."""
    began = time.monotonic()
    deadline = began + timeout
    last_alerts, quiet_since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        values = metric_values(server.base)
        alerts = sum(v for k, v in values.items() if k.startswith(ALERTS + "{"))
        if alerts != last_alerts:
            last_alerts, quiet_since = alerts, time.monotonic()
        cpu = proc_cpu_seconds(server.pid)
        time.sleep(2.0)
        busy = (proc_cpu_seconds(server.pid) - cpu) / 2.0
        if values.get(RESYNCS, 0.0) >= 2 and time.monotonic() - quiet_since >= 5 and busy < 0.15:
            return time.monotonic() - began
    raise TimeoutError(f"server not settled after {timeout}s")


# -- the server's child processes (the authorize port's process) ---------------------------


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc; psutil is not a dependency)."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    out[int(entry)] = int(handle.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
    return out


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, parent in parent_pids().items():
        children.setdefault(parent, []).append(child)
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stat_field(pid: int, index: int) -> int | None:
    """Field `index` (0 = the state) after the command name of /proc/PID/stat, None if the
    process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rpartition(")")[2].split()[index])
    except (OSError, IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), to tell it from a reused pid."""
    return _stat_field(pid, 19)


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP `port` (any address)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            listening = len(fields) > 9 and fields[3] == "0A"  # TCP_LISTEN
            if listening and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    return inodes


def authorize_pids(server_pid: int, port: int) -> tuple[list[int], str]:
    """The server's child process(es) answering the authorize port, and how they were
    found: the descendants holding a socket that listens on `port` (and their own
    descendants), else every descendant of the server."""
    kids = descendants(server_pid)
    marks = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    owners: list[int] = []
    for pid in kids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in marks:
                    owners.append(pid)
                    break
            except OSError:
                continue
    if not owners:
        return kids, f"no child found listening on {port}: all {len(kids)} descendants"
    pids = list(owners)
    for pid in owners:
        pids += [p for p in descendants(pid) if p not in pids]
    return pids, f"pids {pids}, listening on {port}"


def nice_of(pid: int) -> int | None:
    """The process's nice value (/proc/PID/stat field 19), None if it is gone."""
    return _stat_field(pid, 16)


def policy_of(pid: int) -> str:
    """The process's scheduling policy and real-time priority, e.g. "SCHED_RR 10"."""
    names = {os.SCHED_OTHER: "normal", os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR"}
    try:
        policy = os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK
        priority = os.sched_getparam(pid).sched_priority
    except OSError:
        return "?"
    name = names.get(policy, str(policy))
    return f"{name} {priority}" if priority else name


def slice_us_of(pid: int) -> int | None:
    """The CPU slice the kernel gives the process's main thread (/proc/PID/sched, Linux
    6.6+), in microseconds; None where it is not shown."""
    try:
        with open(f"/proc/{pid}/sched") as handle:
            for line in handle:
                if line.startswith("se.slice"):
                    return int(float(line.split(":")[1])) // 1000
    except (OSError, ValueError):
        pass
    return None


def cpu_seconds_of(pids: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid in pids:
        try:
            out[pid] = proc_cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue
    return out


def wait_authorize_port(server: Server, port: int, timeout: float) -> float:
    """Until GET /healthz on the authorize port answers 200; seconds waited."""
    began = time.perf_counter()
    last = "no answer"
    while True:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}: {server.log_tail()}")
        try:
            status, body = http("GET", f"http://127.0.0.1:{port}/healthz", timeout=2)
            if status == 200:
                return time.perf_counter() - began
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        if time.perf_counter() - began >= timeout:
            break
        time.sleep(0.2)
    raise RuntimeError(
        f"--authorize-port: `metering serve` was started with METERING_AUTHORIZE_PORT={port}"
        f" but GET /healthz on 127.0.0.1:{port} did not answer 200 within {timeout:.0f} s of"
        f" the main port being ready (last: {last}). Does this server support"
        f" METERING_AUTHORIZE_PORT? Server log tail:\n{server.log_tail(10)}"
    )


def start_server(server: Server, timeout: float, authorize_port: int) -> float:
    """`server.start` (returns its seconds until /readyz said 200), then with an authorize
    port until that port answers too, within the same wait."""
    ready = server.start(timeout=timeout)
    if authorize_port:
        waited = wait_authorize_port(server, authorize_port, max(timeout - ready, 10.0))
        print(f"authorize port {authorize_port} answered {waited:.1f} s after /readyz", flush=True)
    return ready


def end_children(kids: list[tuple[int, int | None]], grace: float = 30.0) -> None:
    """After the server stopped: its child processes (pid, start time) still running
    past `grace` seconds are killed (each by its pid, if it is still the same process)."""
    deadline = time.monotonic() + grace
    alive = kids
    while alive:
        alive = [(pid, began) for pid, began in alive if start_time(pid) == began]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for pid, _ in alive:
        print(f"server child {pid} still running after the server stopped: killing it")
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def server_children(server: Server) -> list[tuple[int, int | None]]:
    if server.proc is None or server.proc.poll() is not None:
        return []
    return [(pid, start_time(pid)) for pid in descendants(server.pid)]


def stop_server(server: Server) -> int:
    kids = server_children(server)
    code = server.stop()
    end_children(kids)
    return code


def kill_server(server: Server) -> None:
    kids = server_children(server)
    server.kill()
    end_children(kids, grace=5.0)


# -- the runs ---------------------------------------------------------------------------------


def generate(args: argparse.Namespace, port: int, requests: list[bytes]) -> OpenLoopResult:
    """run_open_loop; with --generator-slice-us or --generator-nice, in a thread of its own
    that asks for that CPU slice or priority (a thread's own: processes started later do not
    inherit them)."""

    def run() -> OpenLoopResult:
        return run_open_loop(
            "127.0.0.1",
            port,
            requests,
            rate=args.rate,
            seconds=args.seconds,
            connections=args.connections,
        )

    if not args.generator_slice_us and not args.generator_nice:
        return run()
    from metering.budgets.replica import shorten_slice

    out: list[OpenLoopResult] = []

    def in_thread() -> None:
        if args.generator_nice:  # Linux: a thread's nice value is its own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), args.generator_nice)
        shorten_slice(args.generator_slice_us)
        out.append(run())

    thread = threading.Thread(target=in_thread, name="generator")
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError("the load generator's thread failed (see above)")
    return out[0]


def timed_open_loop(
    server: Server,
    requests: list[bytes],
    args: argparse.Namespace,
    name: str,
    *,
    port: int | None = None,
    child_pids: list[int] | None = None,
    ingest: IngestWorker | None = None,
) -> dict[str, Any]:
    """One open-loop run against `port` (default the server's main port). `child_pids`:
    the authorize port's process(es), whose CPU the server CPU then includes. `ingest`:
    the paced ingest worker, checked to be running still when the run ends."""
    cpu_before = proc_cpu_seconds(server.pid)
    child_before = cpu_seconds_of(child_pids or [])
    load_before = load()
    steal_before = steal_seconds()
    wall_start = time.time()
    result = generate(
        args,
        server.port if port is None else port,
        requests,
    )
    wall_end = time.time()
    ingest_alive = ingest is not None and ingest.running()
    server_cpu = proc_cpu_seconds(server.pid) - cpu_before
    child_after = cpu_seconds_of(list(child_before))
    row = summarize(result, name)
    row["server_cpu"] = server_cpu / result.seconds
    if child_pids is not None:
        child_cpu = sum(child_after[p] - child_before[p] for p in child_after)
        row["main_cpu"] = row["server_cpu"]
        row["authorize_cpu"] = child_cpu / result.seconds
        row["server_cpu"] += row["authorize_cpu"]
    # The run's span, wall clock (a bracket around its first send and last reply).
    row["wall_start"], row["wall_end"] = wall_start, wall_end
    if ingest is not None:
        row["ingest_alive_at_end"] = ingest_alive
    row["load"] = f"{load_before} -> {load()}"
    # Cores the hypervisor took meanwhile: a tail no code here can cause (or mend).
    row["steal"] = (steal_seconds() - steal_before) / (wall_end - wall_start)
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        with open(args.trace / f"{slug}.csv", "w") as f:
            f.write("sent_s,latency_ms\n")
            for at, lat in zip(result.sent_at, result.latencies, strict=True):
                f.write(f"{at:.6f},{lat * 1e3:.3f}\n")
    print(f"  {name}: {json.dumps(row)}", flush=True)
    return row


def summarize(r: OpenLoopResult, name: str) -> dict[str, Any]:
    ms = [x * 1e3 for x in r.latencies]
    late = [x * 1e3 for x in r.lateness]
    return {
        "name": name,
        "sent": r.sent,
        "rate": r.rate,
        "p50": percentile(ms, 0.5),
        "p99": percentile(ms, 0.99),
        "max": max(ms) if ms else float("nan"),
        "late_p99": percentile(late, 0.99),
        "late_max": max(late) if late else float("nan"),
        "gen_cpu": r.cpu_seconds / r.seconds if r.seconds else float("nan"),
        "statuses": r.statuses,
        "denied": r.denied,
        "errors": r.errors[:3],
    }


def start_profiler(pid: int, path: Path | None) -> subprocess.Popen[bytes] | None:
    if path is None:
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250"]
    command += ["--threads", "--nonblocking", "--output", str(path)]
    if os.environ.get("EXP_PYSPY_GIL"):
        command.append("--gil")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is None:
        return
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(60)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait(10)


class Worker:
    """`python -m bench.authorize_load <command>` in its own process: it prints a "ready"
    line, starts on "go", and prints its result as one JSON line."""

    def __init__(self, command: list[str]) -> None:
        self.name = command[0]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.authorize_load", *command],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"{self.name} worker did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited with {self.proc.wait(10)}")
        result: dict[str, Any] = json.loads(line)
        return result

    def ready(self, timeout: float = 600.0) -> int:
        return int(self._line(timeout)["ready"])

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 600.0) -> dict[str, Any]:
        out = self._line(timeout)
        self.proc.wait(30)
        return out

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Ask a paced run or a flood to stop (SIGUSR1): it finishes the requests in
        flight, then prints its result (read it with `result`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class IngestWorker(Worker):
    """The ingest worker: `--mode max` (closed loop) or `paced` at `rate` events/s."""

    def __init__(self, port: int, token: str, mode: str, events: int, rate: float) -> None:
        super().__init__(
            [
                "ingest",
                "--port",
                str(port),
                "--token",
                token,
                "--mode",
                mode,
                "--events",
                str(events),
                "--rate",
                str(rate),
                "--run-id",
                os.urandom(4).hex(),
            ]
        )


class FloodWorker(Worker):
    """Checks closed loop on `connections` connections to `port` until `stop`."""

    def __init__(self, port: int, requests_file: Path, connections: int) -> None:
        super().__init__(
            [
                "flood",
                "--port",
                str(port),
                "--requests",
                str(requests_file),
                "--connections",
                str(connections),
            ]
        )


# The paced ingest of the mixed runs is sized for the runs' nominal time PACED_STRETCH times
# over plus margins, and stopped once the runs are over: a run under ingest can last well
# past its nominal time (the generator waits for replies on its few connections). On a
# slower machine (2026-11-29) the main port's runs under ingest took 92-104 s for 20 s
# nominal, and three times over ran out before the authorize port's run. The worker
# reuses 400K built events (the bodies are sent, not built), so the size costs no memory.
# Whether ingest covered each run is checked (`ingest_coverage`), not assumed.
PACED_EVENTS_MAX = 60_000_000
PACED_MARGIN_S = 15.0  # the 2 s head start, connections, the gaps between runs
PACED_STRETCH = 8


def paced_events(rate: float, runs: int, seconds: float) -> int:
    span = PACED_STRETCH * runs * seconds + PACED_MARGIN_S
    events = -(-int(rate * span) // 1000) * 1000
    if events > PACED_EVENTS_MAX:
        print(
            f"paced ingest: {events:,} events would cover {span:.0f} s at {rate:,.0f}/s;"
            f" capped at {PACED_EVENTS_MAX:,} ({PACED_EVENTS_MAX / rate:.0f} s) (a bound)",
            flush=True,
        )
        events = PACED_EVENTS_MAX
    return events


def ingest_coverage(row: dict[str, Any], paced: dict[str, Any]) -> bool:
    """Whether the paced ingest was on from before the run's first request to after its
    last reply (wall clock), and its worker still running when the run ended."""
    row["ingest_lead_s"] = row["wall_start"] - paced["start_wall"]
    row["ingest_tail_s"] = paced["end_wall"] - row["wall_end"]
    covered = bool(
        paced["start_wall"] > 0  # it sent at all
        and row["ingest_lead_s"] >= 0
        and row["ingest_tail_s"] >= 0
        and row["ingest_alive_at_end"]
    )
    row["ingest_covered"] = covered
    return covered


FLOOD_CONNECTIONS = 16  # closed loop: as many checks as the authorize process answers


def ingest_run(
    server: Server,
    token: str,
    events: int,
    auth_pids: list[int],
    flood: FloodWorker | None = None,
) -> dict[str, Any]:
    """Ingest at its maximum (closed loop, 4 connections) until every row is stored, with
    `flood` (a ready FloodWorker) on from 1 s before until the last row is stored."""
    worker = IngestWorker(server.port, token, "max", events, 0.0)
    try:
        worker.ready()
        stored_before = metric_values(server.base).get(STORED, 0.0)
        if flood is not None:
            flood.go()
            time.sleep(1.0)
        cpu_before = proc_cpu_seconds(server.pid)
        child_before = cpu_seconds_of(auth_pids)
        steal_before = steal_seconds()
        began = time.perf_counter()
        worker.go()
        top = worker.result()
        wait_stored(server.base, stored_before + top["events"])
        seconds = time.perf_counter() - began
        child_after = cpu_seconds_of(list(child_before))
        row: dict[str, Any] = {
            "events": top["events"],
            "failures": top["failures"],
            "acked_per_s": top["events_per_s"],
            "stored_per_s": top["events"] / seconds,
            "seconds": seconds,
            "main_cpu": (proc_cpu_seconds(server.pid) - cpu_before) / seconds,
            "authorize_cpu": sum(child_after[p] - child_before[p] for p in child_after) / seconds,
            "steal": (steal_seconds() - steal_before) / seconds,
            "load": load(),
        }
    finally:
        worker.kill()
    if flood is not None:
        flood.stop()
        row["flood"] = flood.result()
    return row


def run_flood(
    args: argparse.Namespace,
    server: Server,
    work: Path,
    auth_port: int,
    auth_pids: list[int],
    token: str,
    bodies: list[bytes],
) -> list[dict[str, Any]]:
    """What a flood of checks on the authorize port costs ingest: ingest at its maximum
    alone, under a flood of valid checks, of one unknown key sent again and again (a
    revoked key still configured: 401, remembered after the first lookup), of a fresh
    unknown key each time (401 after a database lookup each, the costliest path), and
    alone again (the two alone runs bracket the machine's drift)."""
    valid = [json_post("127.0.0.1", auth_port, token, "/v1/authorize", b) for b in bodies]
    revoked = "mk_" + os.urandom(16).hex()
    one = [json_post("127.0.0.1", auth_port, revoked, "/v1/authorize", b) for b in bodies]
    fresh = [
        json_post("127.0.0.1", auth_port, "mk_" + os.urandom(16).hex(), "/v1/authorize", b)
        for b in bodies
    ]
    files = {}
    for name, requests in (("valid", valid), ("one", one), ("fresh", fresh)):
        files[name] = work / f"flood-{name}.pickle"
        with open(files[name], "wb") as f:
            pickle.dump(requests, f)
    events = args.ingest_max_events
    runs = []
    for name, kind in (
        ("ingest alone", None),
        ("ingest + a flood of valid checks", "valid"),
        ("ingest + a flood of one unknown key (401)", "one"),
        ("ingest + a flood of fresh unknown keys (401)", "fresh"),
        ("ingest alone, again", None),
    ):
        if args.wait_quiet > 0:
            wait_for_quiet(args.wait_quiet)
        flood = None
        if kind is not None:
            flood = FloodWorker(auth_port, files[kind], FLOOD_CONNECTIONS)
            flood.ready()
        try:
            row = ingest_run(server, token, events, auth_pids, flood)
        finally:
            if flood is not None:
                flood.kill()
        row["name"] = name
        print(f"  {name}: {json.dumps(row)}", flush=True)
        runs.append(row)
    return runs


def run_http(args: argparse.Namespace, work: Path, parts: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    began = time.perf_counter()
    u = universe(args.tenants, args.fraction, args.seed)
    admin = "bench-admin-" + os.urandom(8).hex()
    port = free_port()
    auth_port = 0
    env: dict[str, str] = {}
    if args.authorize_port:
        while auth_port in (0, port):
            auth_port = free_port()
        env["METERING_AUTHORIZE_PORT"] = str(auth_port)
        env["METERING_AUTHORIZE_NICE"] = str(args.authorize_nice)
        env["METERING_AUTHORIZE_SLICE_US"] = str(args.authorize_slice_us)
        env["METERING_AUTHORIZE_REALTIME_PRIORITY"] = str(args.authorize_realtime)
        out["authorize_port"] = auth_port
    server = Server(work / "data", port, admin, extra_env=env)
    workers: list[IngestWorker] = []
    try:
        out["start1_s"] = start_server(server, 300, auth_port)
        post_prices(server.base, admin)
        status, body = http(
            "POST",
            f"{server.base}/v1/api-keys",
            token=admin,
            body={"scopes": ["ingest"], "name": "bench"},
        )
        if status != 201:
            raise RuntimeError(f"creating an ingest key: {status} {body!r}")
        token = json.loads(body)["key"]
        lines = seed_lines(u, args.seed, os.urandom(4).hex(), now_utc())
        bodies = [
            loadgen.post_request("127.0.0.1", server.port, token, loadgen.json_body(chunk))
            for chunk in loadgen.batches(lines, 1000)
        ]
        expect = [len(chunk) for chunk in loadgen.batches(lines, 1000)]
        loop = loadgen.new_event_loop()
        try:
            seeded = loop.run_until_complete(
                loadgen.run_load(
                    "127.0.0.1", server.port, bodies, expect_accepted=expect, concurrency=4
                )
            )
        finally:
            loop.close()
        if seeded.failures:
            raise RuntimeError(f"seed ingest: {seeded.failures[:3]}")
        wait_stored(server.base, len(lines))
        out["seed_events"] = len(lines)
        out["seed_s"] = seeded.seconds
        del bodies, lines
        stop_server(server)
        out["budgets"] = insert_budgets(work / "data" / "metering.db", u.budgets, now_utc())
        out["budgeted_tenants"] = len(u.budgeted)
        out["tenants"] = len(u.accounts)
        out["hard"] = sum(1 for b in u.budgets if b.hard)
        out["start2_s"] = start_server(server, 600, auth_port)
        out["setup_s"] = time.perf_counter() - began
        out["rss_after_start_mib"] = proc_status_kib(server.pid, "VmRSS") / 1024
        out["settle_s"] = wait_settled(server)
        settled = metric_values(server.base)
        out["alerts_at_start"] = sum(v for k, v in settled.items() if k.startswith(ALERTS + "{"))
        print(f"set up in {out['setup_s']:.0f}s: {json.dumps(out)}", flush=True)

        bodies = authorize_bodies(u, 40_000, args.seed)
        requests = [json_post("127.0.0.1", server.port, token, "/v1/authorize", b) for b in bodies]
        health = [get_request("127.0.0.1", server.port, "/healthz")]
        # Warm-up (connections, first-call caches): 1 s each, not reported.
        run_open_loop("127.0.0.1", server.port, health, rate=500, seconds=1, connections=2)
        run_open_loop("127.0.0.1", server.port, requests, rate=500, seconds=1, connections=2)
        auth_requests: list[bytes] = []
        auth_pids: list[int] = []
        if auth_port:
            auth_requests = [
                json_post("127.0.0.1", auth_port, token, "/v1/authorize", b) for b in bodies
            ]
            warm = run_open_loop(
                "127.0.0.1", auth_port, auth_requests, rate=500, seconds=1, connections=2
            )
            if not warm.statuses.get(200):
                raise RuntimeError(
                    f"--authorize-port: POST /v1/authorize on port {auth_port} answered no"
                    f" 200: {warm.statuses} {warm.errors[:3]}"
                )
            auth_pids, how = authorize_pids(server.pid, auth_port)
            nices = sorted({nice_of(pid) for pid in auth_pids})
            how += f", nice {', '.join(map(str, nices))} (asked {args.authorize_nice})"
            slices = sorted({slice_us_of(pid) for pid in auth_pids}, key=str)
            how += f", CPU slice {', '.join(map(str, slices))} us"
            how += f" (asked {args.authorize_slice_us or 'the kernel default'})"
            policies = sorted({policy_of(pid) for pid in auth_pids})
            how += f", scheduling {', '.join(policies)}"
            rt = args.authorize_realtime
            how += f" (asked {f'SCHED_RR {rt}' if rt else 'normal'})"
            out["authorize_pids"] = how
            print(f"authorize port {auth_port}: its process(es): {how}", flush=True)
        auth_name = "POST /v1/authorize (authorize port)"
        if "http" in parts:
            if args.wait_quiet > 0:
                busy = wait_for_quiet(args.wait_quiet)
                print(f"machine: {busy:.2f} cores busy with other work before the run")
            out["alone"] = [
                timed_open_loop(server, health, args, "GET /healthz (baseline)"),
            ]
            profiler = start_profiler(server.pid, args.profile)
            try:
                out["alone"].append(timed_open_loop(server, requests, args, "POST /v1/authorize"))
            finally:
                stop_profiler(profiler)
            if auth_port:
                out["alone"].append(
                    timed_open_loop(
                        server, auth_requests, args, auth_name, port=auth_port, child_pids=auth_pids
                    )
                )
        if "mixed" in parts:
            if args.wait_quiet > 0:
                wait_for_quiet(args.wait_quiet)
            if args.ingest_rate > 0:
                half = args.ingest_rate
            else:
                worker = IngestWorker(server.port, token, "max", args.ingest_max_events, 0.0)
                workers.append(worker)
                worker.ready()
                cpu_before = proc_cpu_seconds(server.pid)
                began = time.perf_counter()
                worker.go()
                top = out["ingest_max"] = worker.result()
                top["server_cpu"] = (proc_cpu_seconds(server.pid) - cpu_before) / top["seconds"]
                # End to end: until the writer has stored every row (the spool absorbs a
                # burst faster than ClickHouse takes it, so acknowledgements alone overstate
                # what the server sustains).
                wait_stored(server.base, top["events"])
                top["stored_per_s"] = top["events"] / (time.perf_counter() - began)
                print(f"ingest max: {json.dumps(top)}", flush=True)
                basis = "stored_per_s" if args.ingest_basis == "stored" else "events_per_s"
                half = top[basis] / 2
            events = paced_events(half, 3 if auth_port else 2, args.seconds)
            paced = IngestWorker(server.port, token, "paced", events, half)
            workers.append(paced)
            paced.ready()
            # the writer has stored the max run's rows before the paced run starts
            if "ingest_max" in out:
                wait_stored(server.base, out["ingest_max"]["events"])
            paced.go()
            time.sleep(2.0)
            name = "GET /healthz (baseline), ingest on"
            out["mixed"] = [timed_open_loop(server, health, args, name, ingest=paced)]
            mixed_profile = args.profile and args.profile.with_suffix(".mixed.txt")
            profiler = start_profiler(server.pid, mixed_profile)
            try:
                name = "POST /v1/authorize, ingest on"
                out["mixed"].append(timed_open_loop(server, requests, args, name, ingest=paced))
            finally:
                stop_profiler(profiler)
            if auth_port:
                out["mixed"].append(
                    timed_open_loop(
                        server,
                        auth_requests,
                        args,
                        auth_name + ", ingest on",
                        port=auth_port,
                        child_pids=auth_pids,
                        ingest=paced,
                    )
                )
            paced.stop()
            out["ingest_paced"] = paced.result()
            out["ingest_paced"]["target"] = half
            out["ingest_paced"]["events_built"] = events
            out["ingest_basis"] = "fixed" if args.ingest_rate > 0 else args.ingest_basis
            print(f"ingest paced: {json.dumps(out['ingest_paced'])}", flush=True)
            for row in out["mixed"]:
                covered = ingest_coverage(row, out["ingest_paced"])
                print(
                    f"ingest covered the whole of {row['name']!r}: "
                    f"{'yes' if covered else 'NO !!!'} (ingest on from "
                    f"{row['ingest_lead_s']:.2f} s before its start to {row['ingest_tail_s']:.2f}"
                    f" s after its end; worker running at its end: {row['ingest_alive_at_end']})",
                    flush=True,
                )
        if "flood" in parts:
            if not auth_port:
                raise SystemExit("--parts flood needs --authorize-port")
            out["flood"] = run_flood(args, server, work, auth_port, auth_pids, token, bodies)
        out["rss_end_mib"] = proc_status_kib(server.pid, "VmHWM") / 1024
        final = metric_values(server.base)
        out["resyncs"] = final.get(RESYNCS, 0.0)
        out["resync_s"] = final.get(RESYNC_SECONDS, 0.0)
        out["exit_code"] = stop_server(server)
        if "asgi" in parts:
            listed = work / "authorize_bodies.json"
            listed.write_text(json.dumps([b.decode() for b in bodies[:5_000]]))
            (work / "tokens.json").write_text(json.dumps({"admin": admin, "ingest": token}))
            command = [sys.executable, "-m", "bench.authorize_asgi", str(work / "data")]
            asgi = subprocess.run(
                [*command, admin, token, str(listed)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if asgi.returncode != 0:
                raise RuntimeError(f"authorize_asgi: {asgi.stderr[-2000:]}")
            out["asgi"] = json.loads(asgi.stdout.strip().splitlines()[-1])
            print(f"asgi: {json.dumps(out['asgi'])}", flush=True)
    finally:
        for w in workers:
            w.kill()
        kill_server(server)
        if server.log_path is not None and server.log_path.exists():
            tail = server.log_tail(10)
            if "Traceback" in tail or "ERROR" in tail:
                print("server log tail:\n" + tail)
    return out
