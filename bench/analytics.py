"""Read endpoints over HTTP next to raw-table queries of the same questions, in one run.

    .venv/bin/python -m bench.analytics                                # seed month: 24.5M, 210K
    .venv/bin/python -m bench.analytics --events 500000 --tenants 5000 # small, < 2 minutes
    .venv/bin/python -m bench.analytics --data-dir /tmp/seed --results bench/RESULTS.md

1. Fill: `metering simulate backfill` (the CLI, as a user would run it) into a fresh data
   dir, or reuse `--data-dir` when it already holds events.
2. For each question: start `metering serve` on the data dir, wait for /readyz, time one
   warm-up plus K sequential GETs over one keep-alive connection (httpx), stop the server;
   then, in a separate process on the same data dir (chDB: one process per path), time one
   warm-up plus K runs of the raw SQL of the same question over `rerank_events` with
   `optimize_use_projections = 0` (bench/analytics_raw.py), for the window the endpoint
   reported. Server and raw query alternate per question, so both sides of a ratio are
   measured minutes apart at most.
3. Compare the figures: /v1/stats (every figure, spend to the last digit), /v1/usage of one
   tenant (every bucket), /v1/providers (counts, peaks, uptime exactly; latency within the
   sketch's 1 %), the first page of /v1/requests (the same event ids).
4. Print a table (p50, p99 in ms, and the endpoint's p50 as a ratio of the raw query's) and
   append it with the command line and the machine to `--results`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.analytics_check import (
    check_providers,
    check_requests,
    check_stats,
    check_usage,
    price_bounds_ms,
)
from bench.analytics_http import Server, Timed, measure, metering_command, percentile, service_env

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Analytics reads over HTTP vs raw-table queries (bench/analytics.py)"


@dataclass
class Question:
    name: str
    path: str
    params: dict[str, str]
    raw_job: str | None  # bench/analytics_raw.py job; None: no raw counterpart
    target: str
    ratio_target: float | None = None  # endpoint p50 / raw p50 at most
    ms_target: float | None = None  # endpoint p50 at most
    endpoint: Timed | None = None
    raw_times: list[float] = field(default_factory=list)
    raw_error: str = ""
    server_start_s: float = 0.0
    settle_s: float = 0.0
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def request(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.params.items())
        return self.path + (f"?{query}" if query else "")

    def p(self, side: str, q: float) -> float | None:
        times = (
            (self.endpoint.times_ms if self.endpoint else []) if side == "ep" else self.raw_times
        )
        return percentile(times, q) if times else None

    def ratio(self) -> float | None:
        ep, raw = self.p("ep", 0.5), self.p("raw", 0.5)
        return ep / raw if ep is not None and raw else None

    def verdict(self) -> str:
        ep, ratio = self.p("ep", 0.5), self.ratio()
        if ep is None:
            return "FAILED"
        if self.ratio_target is not None:
            return "n/a" if ratio is None else ("met" if ratio <= self.ratio_target else "MISSED")
        if self.ms_target is not None:
            return "met" if ep <= self.ms_target else "MISSED"
        return "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=24_500_000)
    parser.add_argument("--tenants", type=int, default=210_000)
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument(
        "--data-dir", type=Path, help="reused when it already holds events; kept after the run"
    )
    parser.add_argument("--requests", type=int, default=50, help="timed calls per endpoint (K)")
    parser.add_argument("--results", type=Path, help="append the run to this file")
    parser.add_argument("--note", default="", help="a line for the results entry")
    parser.add_argument("--fill-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--tenant", help="the tenant of the per-tenant questions (default: busiest)"
    )
    parser.add_argument(
        "--only",
        help="comma-separated endpoints to ask: stats, usage, providers, requests, incidents",
    )
    parser.add_argument(
        "--fill-only", action="store_true", help="fill --data-dir (if empty) and stop"
    )
    return parser.parse_args(argv)


def run_raw(data_dir: Path, job: str, params: dict[str, Any], k: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.analytics_raw",
            "--data-dir",
            str(data_dir),
            "--job",
            job,
            "--params",
            json.dumps(params),
            "--k",
            str(k),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"raw job {job} failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def fill(args: argparse.Namespace, data_dir: Path) -> tuple[float, str]:
    """`metering simulate backfill` into data_dir; seconds and its summary line."""
    command = [
        *metering_command(),
        "simulate",
        "backfill",
        "--days",
        str(args.days),
        "--events",
        str(args.events),
        "--tenants",
        str(args.tenants),
    ]
    print("fill:", shlex.join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    out = subprocess.run(
        command,
        cwd=data_dir.parent,
        env=service_env(data_dir),
        capture_output=True,
        text=True,
        timeout=args.fill_timeout,
    )
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"backfill failed ({out.returncode}): {out.stderr[-2000:]}")
    lines = out.stdout.strip().splitlines()
    return seconds, lines[-1] if lines else ""


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def questions(tenant: str) -> list[Question]:
    return [
        Question("stats, platform, 30d", "/v1/stats", {"window": "30d"}, "stats",
                 "p50 <= 1/20 of raw", ratio_target=1 / 20),
        Question("usage, one tenant, by day", "/v1/usage",
                 {"tenant_id": tenant, "granularity": "day"}, "usage", "p50 <= 20 ms",
                 ms_target=20.0),
        Question("providers, 30d", "/v1/providers", {"window": "30d"}, "providers",
                 "p50 <= 1/10 of raw", ratio_target=1 / 10),
        Question("requests, first page, platform", "/v1/requests", {}, "requests",
                 "p50 <= 50 ms", ms_target=50.0),
        Question("requests, first page, one tenant", "/v1/requests", {"tenant_id": tenant},
                 "requests", "p50 <= 50 ms", ms_target=50.0),
        Question("incidents, 30d", "/v1/incidents", {"window": "30d"}, None, "none"),
    ]  # fmt: skip


def ask(q: Question, data_dir: Path, token: str, k: int, prices: list[dict[str, Any]]) -> None:
    """Endpoint (server up), then the raw query of the same question (server stopped)."""
    server = Server(data_dir, token)
    q.server_start_s = server.start()
    try:
        q.settle_s = server.settle()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.base, headers=headers, timeout=300.0) as client:
            if not prices:
                r = client.get("/v1/prices")
                r.raise_for_status()
                prices.extend(r.json()["prices"])
            q.endpoint = measure(client, q.path, q.params, k)
            ended = datetime.now(UTC)
    finally:
        code = server.stop()
        if code not in (0, -15):
            print(f"server exited {code}: {server.log_tail()}", file=sys.stderr)
    body = q.endpoint.body
    print(f"{q.name}: endpoint p50 {q.p('ep', 0.5)} ms", file=sys.stderr, flush=True)
    if q.raw_job is None or body is None:
        return
    if "from" in body:
        window = {"from_ms": _ms(body["from"]), "to_ms": _ms(body["to"])}
    else:  # the request log's default window: 30 days ending at the request
        window = {"from_ms": _ms((ended - timedelta(days=30)).isoformat()),
                  "to_ms": _ms(ended.isoformat())}  # fmt: skip
    params: dict[str, Any] = {**window, "bounds_ms": price_bounds_ms(prices)}
    if "tenant_id" in q.params:
        params["tenant_id"] = q.params["tenant_id"]
    if q.raw_job == "requests":
        params["limit"] = len(body["requests"]) or 100
    try:
        raw = run_raw(data_dir, q.raw_job, params, k)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        q.raw_error = str(exc)
        return
    q.raw_times = raw["times_ms"]
    print(f"{q.name}: raw p50 {q.p('raw', 0.5)} ms", file=sys.stderr, flush=True)
    if q.raw_job == "stats":
        q.checks = check_stats(body, raw, prices)
    elif q.raw_job == "usage":
        q.checks = check_usage(body, raw, prices)
    elif q.raw_job == "providers":
        q.checks = check_providers(body, raw)
    else:
        q.checks = check_requests(body, raw)


def machine() -> str:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return f"nproc {os.cpu_count()}, {mem_kib / 1024 / 1024:.1f} GiB RAM"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "metering", "billing", "migrations")
    return head + (" with uncommitted changes (metering/, billing/, migrations/)" if dirty else "")


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.3f} (1/{1 / r:.1f})" if r < 1 else f"{r:.2f} ({r:.1f}x slower)"


def render(qs: list[Question], info: dict[str, str]) -> str:
    lines = [f"### Run {info['date']}", ""]
    for key in ("Command", "Machine", "Commit", "Data", "Note"):
        if info.get(key.lower()):
            lines.append(f"{key}: {info[key.lower()]}  ")
    lines += [
        "Method: per question, `metering serve` on the data dir, ready, then idle (under 5%"
        " of a core for 3 s: its start-up jobs done),"
        f" 1 warm-up + K={info['k']}"
        " sequential GETs on one keep-alive httpx connection; then the server stopped and,"
        " in its own process on the same chDB path, 1 warm-up + K runs of the raw SQL"
        " (`optimize_use_projections = 0`) over the window the endpoint reported. p99 is"
        f" the nearest rank (of {info['k']}: the largest when K <= 100).",
        "",
        "| question | request | endpoint p50 / p99 ms | raw p50 / p99 ms | p50 ratio"
        " endpoint/raw | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for q in qs:
        ratio = q.ratio()
        lines.append(
            f"| {q.name} | `{q.request}` | {_fmt(q.p('ep', 0.5))} / {_fmt(q.p('ep', 0.99))}"
            f" | {_fmt(q.p('raw', 0.5))} / {_fmt(q.p('raw', 0.99))}"
            f" | {_ratio(ratio)}"
            f" | {q.target} | {q.verdict()} |"
        )
    lines += ["", "Figures, endpoint vs raw query (same window):", ""]
    for q in qs:
        for name, ok, detail in q.checks:
            lines.append(f"- {q.name}: {name} {'OK' if ok else 'MISMATCH'} ({detail})")
    failures = [(q, f) for q in qs for f in (q.endpoint.failures if q.endpoint else [])]
    for q, failure in failures[:10]:
        lines.append(f"- {q.name}: FAILED request: {failure}")
    for q in qs:
        if q.raw_error:
            lines.append(f"- {q.name}: raw query FAILED: {q.raw_error[:500]}")
    starts = ", ".join(f"{q.server_start_s:.1f}" for q in qs)
    settles = ", ".join(f"{q.settle_s:.1f}" for q in qs)
    lines += [
        "",
        f"Server start to /readyz 200, per question (s): {starts}; then until idle: {settles}",
    ]
    return "\n".join(lines) + "\n"


def append_results(path: Path, block: str) -> None:
    """Append at the end of the file, under this bench's heading the first time."""
    text = path.read_text() if path.exists() else ""
    head = "" if SECTION in text else f"\n{SECTION}\n"
    with open(path, "a") as f:
        f.write(("\n" if text and not text.endswith("\n") else "") + head + "\n" + block)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # runs the `finally` blocks that stop the server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    command = shlex.join([".venv/bin/python", "-m", "bench.analytics", *(argv or sys.argv[1:])])
    load_before = load_average()
    temp = None
    if args.data_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="bench-analytics-"))
        data_dir = temp / "data"
    else:
        data_dir = args.data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        prepared = None
        if (data_dir / "clickhouse").exists():
            prepared = run_raw(data_dir, "prepare", {}, 0)
        record = data_dir.with_name(data_dir.name + ".fill.txt")  # how a kept dir was filled
        if prepared and prepared["events"] > 0:
            data = f"reused {data_dir}"
            if record.exists():
                data += f" ({record.read_text().strip()})"
        else:
            data_dir.mkdir(exist_ok=True)
            seconds, summary = fill(args, data_dir)
            data = f"filled by the CLI in {seconds:.0f} s: {summary}"
            record.write_text(
                f"filled {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average"
                f" {load_before} before: {data}\n"
            )
            prepared = run_raw(data_dir, "prepare", {}, 0)
        if args.fill_only:
            print(data)
            return 0
        tenant = args.tenant or prepared["busiest_tenant"]
        span = (prepared["max_ms"] - prepared["min_ms"]) / 86_400_000
        data += (
            f"; {prepared['events']:,} events over {span:.1f} days, {prepared['tenants']:,}"
            f" tenants, {prepared['probes']:,} probes; busiest tenant {prepared['busiest_tenant']}"
            f" ({prepared['busiest_events']:,} events)"
        )
        if args.tenant:
            data += f"; per-tenant questions ask {args.tenant} (--tenant)"
        print(data, file=sys.stderr, flush=True)
        token = secrets.token_urlsafe(24)
        prices: list[dict[str, Any]] = []
        qs = questions(tenant)
        if args.only:
            wanted = {w.strip() for w in args.only.split(",")}
            qs = [q for q in qs if q.path.removeprefix("/v1/") in wanted]
        for q in qs:
            ask(q, data_dir, token, args.requests, prices)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"`{command}`",
        "machine": f"{machine()}, load average {load_before} before, {load_average()} after",
        "commit": commit(),
        "data": data,
        "note": args.note,
        "k": str(args.requests),
    }
    block = render(qs, info)
    print(block)
    if args.results:
        append_results(args.results, block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
