"""Hostile ingest bodies against a real server: does the event loop stay responsive?

1. starts the app (metering.app.create_app on a fresh temp data dir) under uvicorn
   (httptools, uvloop) on loopback, in its own process;
2. a prober process GETs /healthz every 10 ms over one keep-alive connection and records
   each latency; a sampler reads the server's VmRSS every 20 ms;
3. baseline: the prober alone (idle server); then, per scenario, `--senders` threads
   post the scenario's worst-case body in a loop for `--seconds`, while the prober runs;
4. prints one markdown table: /healthz p50 / p99 / max per scenario, replies by status,
   and the server's peak RSS (sampled VmRSS per scenario, and VmHWM at the end).

The target (issue 10): /healthz p99 <= 50 ms while worst-case bodies are processed.

    .venv/bin/python -m bench.abuse [--seconds 6] [--senders 4] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

TOKEN = "bench-abuse-admin-token"


# -- bodies -------------------------------------------------------------------------------


def _event(i: int | str, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"abuse-{i}",
        "timestamp": (datetime.now(UTC) - timedelta(seconds=30)).isoformat(),
        "tenant_id": "acct-1",
        "project_id": "proj-1",
        "provider": "cohere",
        "model": "rerank-4-pro",
        "status": "ok",
        "documents": 50,
        "input_tokens": 5000,
        "latency_ms": 120.5,
        **extra,
    }


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def body_empty_fallbacks() -> tuple[bytes, str]:
    """One event with 4.5M `{}` fallbacks (and one valid event): ~14 MB."""
    many = _dumps(_event("many"))[:-1] + b',"fallbacks":[' + b",".join([b"{}"] * 4_500_000)
    return b'{"events":[' + _dumps(_event("ok")) + b"," + many + b"]}]}", "application/json"


def body_valid_fallbacks() -> tuple[bytes, str]:
    """One event with 500k valid fallbacks: ~16 MB."""
    attempt = b'{"provider":"a","latency_ms":1}'
    many = _dumps(_event("many"))[:-1] + b',"fallbacks":[' + b",".join([attempt] * 500_000)
    return b'{"events":[' + many + b"]}]}", "application/json"


def body_ndjson_garbage() -> tuple[bytes, str]:
    """16 MiB of NDJSON garbage: short lines (millions of them)."""
    line = b"\x01{garbage [1,2\n"
    return line * (16 * 1024 * 1024 // len(line)), "application/x-ndjson"


def body_ndjson_long_garbage() -> tuple[bytes, str]:
    """16 MiB of NDJSON garbage in 10,000 lines of ~1.6 KB."""
    line = b'{"a":[' + b"1," * 830 + b"x\n"
    return line * 10_000, "application/x-ndjson"


def body_many_fallbacks_each() -> tuple[bytes, str]:
    """10,000 events with 16 `{}` fallbacks each and a bad field: all rejected."""
    attempts: list[dict[str, Any]] = [{}] * 16
    events = [_event(i, documents=-1, fallbacks=attempts) for i in range(10_000)]
    return _dumps({"events": events}), "application/json"


def body_valid_16_fallbacks() -> tuple[bytes, str]:
    """10,000 valid events with 16 fallbacks each (~9 MB): accepted once, then
    duplicates."""
    attempts = [{"provider": "azure", "model": "m", "latency_ms": 3.5}] * 16
    events = [_event(f"v16-{i}", fallbacks=attempts) for i in range(10_000)]
    return _dumps({"events": events}), "application/json"


def body_deep_json() -> tuple[bytes, str]:
    """16 MiB of `[` inside the envelope."""
    return b'{"events":' + b"[" * (16 * 1024 * 1024 - 20) + b"}", "application/json"


def body_deep_ndjson() -> tuple[bytes, str]:
    """10,000 NDJSON lines each nested 1,500 deep (~30 MB would be too much: 15 MB)."""
    line = b'{"a":' + b"[" * 750 + b"]" * 750 + b"}\n"
    return line * 10_000, "application/x-ndjson"


def body_bad_utf8() -> tuple[bytes, str]:
    """10,000 events, each with invalid UTF-8 in a string."""
    event = _dumps(_event("u")).replace(b"acct-1", b"acct-\xff")
    return b'{"events":[' + b",".join([event] * 10_000) + b"]}", "application/json"


SCENARIOS: dict[str, Callable[[], tuple[bytes, str]]] = {
    "4.5M `{}` fallbacks in one event": body_empty_fallbacks,
    "500k valid fallbacks in one event": body_valid_fallbacks,
    "16 MiB NDJSON garbage, short lines": body_ndjson_garbage,
    "16 MiB NDJSON garbage, 10,000 lines": body_ndjson_long_garbage,
    "10,000 events x 16 `{}` fallbacks": body_many_fallbacks_each,
    "10,000 valid events x 16 fallbacks": body_valid_16_fallbacks,
    "JSON nested 16M deep": body_deep_json,
    "10,000 NDJSON lines nested 1,500 deep": body_deep_ndjson,
    "10,000 events with invalid UTF-8": body_bad_utf8,
}


# -- server, prober, sampler ---------------------------------------------------------------


def _freeze(_: Any) -> None:
    import gc

    gc.freeze()


def _serve(data_dir: str, port: int, freeze: bool) -> None:
    import uvicorn

    from metering.app import create_app
    from metering.settings import Settings

    settings = Settings(data_dir=Path(data_dir), admin_token=TOKEN, _env_file=None)
    hooks: list[Callable[[Any], None]] = [_freeze] if freeze else []
    app = create_app(settings, TOKEN, run_scheduler=False, startup_hooks=hooks)
    uvicorn.run(
        app, host="127.0.0.1", port=port, http="httptools", loop="uvloop", log_level="error"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, timeout: float = 180.0) -> None:
    """Until an empty batch gets 202 (ingest answers 503 while the stores start)."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/v1/events", body=b'{"events": []}', headers=headers)
            if conn.getresponse().status == 202:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not ready")


def _probe(port: int, seconds: float, out: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)
    out.put(latencies)


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self, key: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak

    def hwm(self) -> int:
        return self._rss("VmHWM")


def _send_loop(
    port: int, body: bytes, content_type: str, until: float, statuses: Counter[int]
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
    while time.monotonic() < until:
        try:
            conn.request("POST", "/v1/events", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            statuses[response.status] += 1
        except (OSError, http.client.HTTPException):
            statuses[0] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_scenario(
    port: int,
    pid: int,
    name: str,
    body: bytes | None,
    content_type: str,
    seconds: float,
    senders: int,
) -> dict[str, Any]:
    queue: Any = multiprocessing.Queue()
    prober = multiprocessing.Process(target=_probe, args=(port, seconds, queue))
    sampler = RssSampler(pid)
    sampler.start()
    statuses: Counter[int] = Counter()
    prober.start()
    threads = []
    if body is not None:
        until = time.monotonic() + seconds
        threads = [
            threading.Thread(target=_send_loop, args=(port, body, content_type, until, statuses))
            for _ in range(senders)
        ]
        for thread in threads:
            thread.start()
    latencies: list[float] = queue.get(timeout=seconds + 120)
    prober.join(10)
    for thread in threads:
        thread.join(180)
    peak = sampler.stop()
    return {
        "scenario": name,
        "size": len(body) if body is not None else 0,
        "probes": len(latencies),
        "p50": statistics.median(latencies),
        "p99": _pct(latencies, 0.99),
        "max": max(latencies),
        "statuses": dict(sorted(statuses.items())),
        "rss": peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--only", nargs="*", help="scenario names containing these words")
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="gc.freeze() once the services started (a startup hook): the heap of the"
        " start no longer makes every full GC pass long",
    )
    args = parser.parse_args(argv)
    data_dir = tempfile.mkdtemp(prefix="metering-abuse-")
    port = free_port()
    server = multiprocessing.Process(target=_serve, args=(data_dir, port, args.freeze), daemon=True)
    server.start()
    assert server.pid is not None
    rows: list[dict[str, Any]] = []
    try:
        wait_ready(port)
        rows.append(run_scenario(port, server.pid, "idle (baseline)", None, "", args.seconds, 0))
        for name, build in SCENARIOS.items():
            if args.only and not any(word in name for word in args.only):
                continue
            body, content_type = build()
            rows.append(
                run_scenario(port, server.pid, name, body, content_type, args.seconds, args.senders)
            )
            del body
        hwm = RssSampler(server.pid).hwm()
    finally:
        server.terminate()
        server.join(30)
        shutil.rmtree(data_dir, ignore_errors=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    command = " ".join(["python", "-m", "bench.abuse", *(argv or sys.argv[1:])])
    print(f"Command: `{command}`  ")
    print(
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"kernel {platform.release()}; code {commit} + working tree  "
    )
    print(
        f"Senders: {args.senders} threads posting the body in a loop for {args.seconds:g} s"
        " per scenario; prober: GET /healthz every 10 ms, own process, one keep-alive"
        " connection.\n"
    )
    print("| scenario | body | /healthz p50 / p99 / max (ms) | probes | replies | peak RSS |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in row["statuses"].items()) or "-"
        size = f"{row['size'] / 1024 / 1024:.1f} MiB" if row["size"] else "-"
        latency = f"{row['p50']:.1f} / {row['p99']:.1f} / {row['max']:.1f}"
        print(
            f"| {row['scenario']} | {size} | {latency} | {row['probes']} | {statuses}"
            f" | {row['rss'] / 1024 / 1024:.0f} MiB |"
        )
    print(f"\nServer VmHWM at the end: {hwm / 1024 / 1024:.0f} MiB")
    worst = max(row["p99"] for row in rows)
    verdict = "met" if worst <= 50 else "MISSED"
    print(f"Target /healthz p99 <= 50 ms in every scenario: {verdict} (worst p99 {worst:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
