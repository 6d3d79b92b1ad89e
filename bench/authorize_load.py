"""Load for bench/authorize.py: an open-loop HTTP generator and a paced ingest worker.

`open_loop` sends pre-encoded HTTP/1.1 requests (authorize POSTs or /healthz GETs) at a
fixed rate: request i is due at t0 + i / rate whatever happened before (open loop), and
goes out on the first of a few keep-alive connections that is free. Latency is measured
from the moment it is written to the reply's last byte; how late each send was against
its due time is recorded too (if the generator or all connections fall behind, that
shows there and in the achieved rate, not hidden). Raw asyncio streams on uvloop, no HTTP
library: a few tens of microseconds of CPU per request (the run reports the generator's
own CPU).

The ingest worker runs in its own process (`python -m bench.authorize_load ingest ...`),
so its 1,000-event bodies do not share an event loop with the authorize generator:
`--mode max` sends as fast as 4 connections can (bench/loadgen.run_load) and prints
events/s; `--mode paced --rate R` sends 1,000-event bodies open-loop at R events/s after
a line on stdin says go, until the bodies run out or a SIGUSR1 says stop. Each prints
one JSON line of results.

The flood worker (`python -m bench.authorize_load flood ...`, also its own process) sends
checks closed loop on N connections, as many as the server answers, until a SIGUSR1: what
a flood of checks (valid, or unauthenticated ones answered 401) costs ingest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import loadgen

BATCH = 1_000


def get_request(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def json_post(host: str, port: int, token: str, path: str, body: bytes) -> bytes:
    return loadgen.post_request(host, port, token, body, path=path)


@dataclass
class OpenLoopResult:
    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # write -> last byte, seconds
    lateness: list[float] = field(default_factory=list)  # write - due, seconds
    sent_at: list[float] = field(default_factory=list)  # write - start, seconds (in step)
    statuses: dict[int, int] = field(default_factory=dict)
    denied: int = 0  # replies with "allowed":false
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the generator's own CPU (user + system) during the run

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float,
    seconds: float,
    connections: int,
    expect: int = 200,
) -> OpenLoopResult:
    """Send `rate` requests/s for `seconds` (cycling through `requests`)."""
    total = int(rate * seconds)
    result = OpenLoopResult()
    clock = time.perf_counter
    counter = iter(range(total))
    streams = [await asyncio.open_connection(host, port) for _ in range(connections)]
    denied_marker = b'"allowed":false'
    start = clock() + 0.05
    cpu_before = os.times()

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in counter:
            due = start + i / rate
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = clock()
            writer.write(requests[i % len(requests)])
            status, body = await loadgen.read_response(reader)
            done = clock()
            result.latencies.append(done - sent)
            result.lateness.append(sent - due)
            result.sent_at.append(sent - start)
            result.sent += 1
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status != expect and len(result.errors) < 20:
                result.errors.append(f"HTTP {status}: {body[:200]!r}")
            if denied_marker in body:
                result.denied += 1

    await asyncio.gather(*(worker(r, w) for r, w in streams))
    result.seconds = clock() - start
    cpu_after = os.times()
    result.cpu_seconds = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    for _, writer in streams:
        writer.close()
    return result


def run_open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float,
    seconds: float,
    connections: int,
) -> OpenLoopResult:
    loop = loadgen.new_event_loop()
    try:
        return loop.run_until_complete(
            open_loop(host, port, requests, rate=rate, seconds=seconds, connections=connections)
        )
    finally:
        loop.close()


# -- the ingest worker (its own process) ----------------------------------------------------


PACED_BUILT = 400_000  # events built for a paced run (about 150 MB of bodies)


class Rounds(Sequence[bytes]):
    """`count` bodies: the built ones again and again, round k with event ids
    `evt_<run>r<k:04x>_...` instead of `evt_<run>r0000_...` (unique across rounds)."""

    def __init__(self, bodies: Sequence[bytes], run_id: str, count: int) -> None:
        self.bodies = bodies
        self.old = f'"evt_{run_id}_'.encode()
        self.stem = run_id[: -len("r0000")]
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not 0 <= i < self.count:
            raise IndexError(i)
        round_, at = divmod(i, len(self.bodies))
        body = self.bodies[at]
        if round_ == 0:
            return body
        return body.replace(self.old, f'"evt_{self.stem}r{round_:04x}_'.encode())


async def paced_ingest(
    host: str,
    port: int,
    bodies: Sequence[bytes],
    rate: float,
    connections: int,
    stop_at: list[float] | None = None,
) -> dict[str, Any]:
    """Send every body once, body i due at t0 + i * BATCH / rate (open loop), or until
    `stop_at` is not empty (it holds the wall-clock time a stop was asked at).

    `start_wall` / `end_wall` (time.time()) bound the span ingest was on: the first body's
    write, and the stop's time if it came with bodies left, else the last body's write."""
    clock = time.perf_counter
    counter = iter(range(len(bodies)))
    accepted = 0
    late_max = 0.0
    failures = 0
    first_wall = last_wall = 0.0
    stopped = False
    streams = [await asyncio.open_connection(host, port, limit=1 << 20) for _ in range(connections)]
    start = clock() + 0.05

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted, late_max, failures, first_wall, last_wall, stopped
        for i in counter:
            due = start + i * BATCH / rate
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop_at:
                stopped = True
                break
            late_max = max(late_max, clock() - due)
            last_wall = time.time()
            first_wall = first_wall or last_wall
            writer.write(bodies[i])
            await writer.drain()
            status, body = await loadgen.read_response(reader)
            if status != 202:
                failures += 1
            else:
                accepted += json.loads(body)["accepted"]

    await asyncio.gather(*(worker(r, w) for r, w in streams))
    seconds = clock() - start
    for _, writer in streams:
        writer.close()
    return {
        "events": accepted,
        "seconds": seconds,
        "events_per_s": accepted / seconds,
        "late_max_s": late_max,
        "failures": failures,
        "start_wall": first_wall,
        "end_wall": stop_at[0] if stopped and stop_at else last_wall,
        "stopped_early": stopped,
    }


def ingest_worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--mode", choices=["max", "paced"], required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args(argv)
    stop_at: list[float] = []  # SIGUSR1: stop the paced run (installed before "ready")

    def stop(signum: int, frame: object) -> None:
        stop_at[:] = stop_at or [time.time()]

    signal.signal(signal.SIGUSR1, stop)
    base_epoch = float(int(time.time()) - 900)
    # Paced: at most PACED_BUILT events are built; past them the bodies are sent again with
    # each event id's run part rewritten per round (same length: Content-Length holds).
    built = args.events if args.mode == "max" else min(args.events, PACED_BUILT)
    run_id = args.run_id if args.mode == "max" else f"{args.run_id}r0000"
    lines = loadgen.build_lines(built, seed=loadgen_seed(), run_id=run_id, base_epoch=base_epoch)
    bodies: Sequence[bytes] = [
        loadgen.post_request("127.0.0.1", args.port, args.token, loadgen.json_body(chunk))
        for chunk in loadgen.batches(lines, BATCH)
    ]
    if args.mode == "paced" and args.events > built:
        bodies = Rounds(bodies, run_id, -(-args.events // BATCH))
    del lines
    print(json.dumps({"ready": len(bodies)}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    if args.mode == "max":

        async def at_max() -> dict[str, Any]:
            result = await loadgen.run_load(
                "127.0.0.1",
                args.port,
                bodies,
                expect_accepted=[BATCH] * len(bodies),
                concurrency=args.connections,
            )
            return {
                "events": result.accepted,
                "seconds": result.seconds,
                "events_per_s": result.accepted / result.seconds,
                "failures": len(result.failures),
            }

        return report(loadgen.new_event_loop(), at_max())
    paced = paced_ingest("127.0.0.1", args.port, bodies, args.rate, args.connections, stop_at)
    return report(loadgen.new_event_loop(), paced)


def report(loop: asyncio.AbstractEventLoop, run: Coroutine[Any, Any, dict[str, Any]]) -> int:
    """Run a worker's `run` on `loop`, then print its figures and this process's CPU
    seconds meanwhile as one JSON line."""
    cpu_before = os.times()
    try:
        out = loop.run_until_complete(run)
    finally:
        loop.close()
    cpu_after = os.times()
    out["cpu_seconds"] = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    print(json.dumps(out), flush=True)
    return 0


async def flood(
    host: str, port: int, requests: Sequence[bytes], connections: int, stopped: asyncio.Event
) -> dict[str, Any]:
    """Closed loop: each connection sends its next request as soon as the reply to the
    last is read, until `stopped` is set. The most checks `connections` callers can get
    answered, which is what a flood of checks asks of the server."""
    clock = time.perf_counter
    statuses: dict[int, int] = {}
    count = 0
    streams = [await asyncio.open_connection(host, port) for _ in range(connections)]
    start = clock()

    async def worker(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        i = n
        while not stopped.is_set():
            writer.write(requests[i % len(requests)])
            status, _ = await loadgen.read_response(reader)
            statuses[status] = statuses.get(status, 0) + 1
            count += 1
            i += connections

    await asyncio.gather(*(worker(n, r, w) for n, (r, w) in enumerate(streams)))
    for _, writer in streams:
        writer.close()
    seconds = clock() - start
    return {
        "checks": count,
        "seconds": seconds,
        "checks_per_s": count / seconds if seconds else 0.0,
        "statuses": statuses,
    }


def flood_worker(argv: list[str]) -> int:
    """`flood --port P --requests FILE --connections N`: FILE holds the raw requests (a
    pickled list of bytes). Prints {"ready": n}, floods after "go" on stdin until SIGUSR1,
    then prints its figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    with open(args.requests, "rb") as f:
        requests: list[bytes] = pickle.load(f)
    loop = loadgen.new_event_loop()
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, stopped.set)
    print(json.dumps({"ready": len(requests)}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    return report(loop, flood("127.0.0.1", args.port, requests, args.connections, stopped))


def loadgen_seed() -> int:
    from bench.authorize_setup import LOADGEN_SEED

    return LOADGEN_SEED


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "ingest":
        sys.exit(ingest_worker(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "flood":
        sys.exit(flood_worker(sys.argv[2:]))
    sys.exit(2)
