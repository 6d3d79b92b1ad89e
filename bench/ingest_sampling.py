"""What a bench/ingest.py run samples from /proc while it loads the server: the server's
memory, CPU (per thread) and the writer's progress, and how busy the shared machine is.

Linux only (/proc); CPU figures are in cores (CPU seconds per wall second).
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

from bench.ingest_server import SPOOL, STORED, metric_values

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


def _cpu_ticks() -> list[int]:
    """The machine's CPU time by kind since boot, in clock ticks (/proc/stat's "cpu" line:
    user, nice, system, idle, iowait, irq, softirq, steal, ...)."""
    with open("/proc/stat") as handle:
        return [int(x) for x in handle.readline().split()[1:]]


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used since boot (from /proc/stat)."""
    fields = _cpu_ticks()
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


def steal_seconds() -> float:
    """CPU seconds the hypervisor has taken from this machine's cores since boot (the
    `steal` field of /proc/stat; 0 where it is not reported)."""
    fields = _cpu_ticks()
    return (fields[7] if len(fields) > 7 else 0) / _CLOCK_TICKS


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
