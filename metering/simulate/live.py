"""Live mode: simulated traffic in real time (timestamps = now) through a gateway client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from metering.simulate.generate import event_dicts, generate_events, iso_timestamp
from metering.simulate.model import PROBE_INTERVAL_MS, PROVIDERS, make_tenants

LIVE_TENANTS = 2_000  # the default of `metering simulate live --tenants`: as many as the demo's


class _Sender(Protocol):
    def send_many(self, events: Any) -> None: ...
    def send_probe(self, probe: Any) -> None: ...
    def flush(self, timeout: float | None = None) -> bool: ...
    def close(self, timeout: float | None = None) -> bool: ...
    def stats(self) -> dict[str, int]: ...


@dataclass
class LiveReport:
    generated_events: int
    generated_probes: int
    seconds: float
    stats: dict[str, int]


def live(
    sender: _Sender,
    *,
    rate: float,
    duration: float,
    seed: int,
    tenants: int,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    stop: threading.Event | None = None,
    tick: float = 0.1,
) -> LiveReport:
    """Send `rate` events/s (timestamps = now) and the probes for `duration` seconds."""
    table = make_tenants(tenants, seed)
    rng = np.random.default_rng([seed, 4])
    run = f"live-{seed}-{int(clock() * 1000)}"
    began = clock()
    sent = probes = 0
    next_probe = [began] * len(PROVIDERS)  # all providers at once, then every 30 s
    try:
        while stop is None or not stop.is_set():
            now = clock()
            elapsed = min(now - began, duration)
            due = int(rate * elapsed) - sent
            if due > 0:
                now_ms = int(now * 1000)
                spread = rng.integers(0, int(tick * 1000) + 1, due)
                times = np.full(due, now_ms, dtype=np.int64) - spread
                cols = generate_events(rng, table, times)
                ids = [f"{run}-{i}" for i in range(sent, sent + due)]
                sender.send_many(event_dicts(cols, table, ids))
                sent += due
            for index, spec in enumerate(PROVIDERS):
                if now >= next_probe[index]:
                    ok = bool(rng.random() < spec.uptime)
                    latency = spec.typical_latency_ms * 0.64 * float(rng.lognormal(0.0, 0.2))
                    probe: dict[str, Any] = {
                        "probe_id": f"{run}-probe-{probes}",
                        "timestamp": iso_timestamp(int(now * 1000)),
                        "provider": spec.name,
                        "region": spec.region,
                        "ok": ok,
                        "latency_ms": round(latency, 3),
                        "http_status": 200 if ok else 503,
                    }
                    if not ok:
                        probe["error"] = "HTTP 503"
                    sender.send_probe(probe)
                    probes += 1
                    next_probe[index] += PROBE_INTERVAL_MS / 1000
            if elapsed >= duration:
                break
            sleep(max(0.0, min(tick, duration - (clock() - began))))
    except KeyboardInterrupt:  # Ctrl-C ends the run early; the summary still prints
        pass
    sender.flush(timeout=30.0)
    return LiveReport(sent, probes, clock() - began, sender.stats())
