"""The HTTP parts of bench/authorize.py: the `metering serve` under test and its set-up,
the open-loop runs, the ingest worker of the mixed runs, and the in-process ASGI figure.

`run_http` returns the figures as a dict; bench/authorize.py renders them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
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
from bench.ingest_sampling import proc_cpu_seconds, proc_status_kib, wait_for_quiet
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


def timed_open_loop(
    server: Server, requests: list[bytes], args: argparse.Namespace, name: str
) -> dict[str, Any]:
    cpu_before = proc_cpu_seconds(server.pid)
    load_before = load()
    result = run_open_loop(
        "127.0.0.1",
        server.port,
        requests,
        rate=args.rate,
        seconds=args.seconds,
        connections=args.connections,
    )
    server_cpu = proc_cpu_seconds(server.pid) - cpu_before
    row = summarize(result, name)
    row["server_cpu"] = server_cpu / result.seconds
    row["load"] = f"{load_before} -> {load()}"
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


class IngestWorker:
    """`python -m bench.authorize_load ingest ...` in its own process."""

    def __init__(self, port: int, token: str, mode: str, events: int, rate: float) -> None:
        command = [
            sys.executable,
            "-m",
            "bench.authorize_load",
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
        self.proc = subprocess.Popen(
            command,
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
                raise TimeoutError("ingest worker did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ingest worker exited with {self.proc.wait(10)}")
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

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def run_http(args: argparse.Namespace, work: Path, parts: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    began = time.perf_counter()
    u = universe(args.tenants, args.fraction, args.seed)
    admin = "bench-admin-" + os.urandom(8).hex()
    server = Server(work / "data", free_port(), admin)
    workers: list[IngestWorker] = []
    try:
        out["start1_s"] = server.start(timeout=300)
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
        server.stop()
        out["budgets"] = insert_budgets(work / "data" / "metering.db", u.budgets, now_utc())
        out["budgeted_tenants"] = len(u.budgeted)
        out["tenants"] = len(u.accounts)
        out["hard"] = sum(1 for b in u.budgets if b.hard)
        out["start2_s"] = server.start(timeout=600)
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
            span = 2 * args.seconds + 6
            events = int(half * span) // 1000 * 1000
            paced = IngestWorker(server.port, token, "paced", events, half)
            workers.append(paced)
            paced.ready()
            # the writer has stored the max run's rows before the paced run starts
            if "ingest_max" in out:
                wait_stored(server.base, out["ingest_max"]["events"])
            paced.go()
            time.sleep(2.0)
            out["mixed"] = [
                timed_open_loop(server, health, args, "GET /healthz (baseline), ingest on"),
            ]
            mixed_profile = args.profile and args.profile.with_suffix(".mixed.txt")
            profiler = start_profiler(server.pid, mixed_profile)
            try:
                out["mixed"].append(
                    timed_open_loop(server, requests, args, "POST /v1/authorize, ingest on")
                )
            finally:
                stop_profiler(profiler)
            out["ingest_paced"] = paced.result()
            out["ingest_paced"]["target"] = half
            out["ingest_basis"] = "fixed" if args.ingest_rate > 0 else args.ingest_basis
            print(f"ingest paced: {json.dumps(out['ingest_paced'])}", flush=True)
        out["rss_end_mib"] = proc_status_kib(server.pid, "VmHWM") / 1024
        final = metric_values(server.base)
        out["resyncs"] = final.get(RESYNCS, 0.0)
        out["resync_s"] = final.get(RESYNC_SECONDS, 0.0)
        out["exit_code"] = server.stop()
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
        server.kill()
        if server.log_path is not None and server.log_path.exists():
            tail = server.log_tail(10)
            if "Traceback" in tail or "ERROR" in tail:
                print("server log tail:\n" + tail)
    return out
