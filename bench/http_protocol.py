"""What the connection limits of metering.http.protocol cost per request.

uvicorn's stock httptools protocol and ours (header limit, idle / header / body timeouts)
are measured in the same run, in alternating rounds so that drift on a shared machine hits
both alike, with a minimal ASGI app that reads the whole body, as the ingest endpoint
does, and answers a fixed 202: with no decoding or storage behind it, the protocol's share
of each request is as large as it can be, so the ratios are a worst case for ingest.
Requests are 1,000-event JSON batches (bench/loadgen.py's events, ~376 KB).

1. In process: the protocol fed the request in 64 KiB chunks (what a loopback read
   delivers) by a stub transport on a uvloop loop, the app's task run to its response;
   CPU time (process_time) per request, median of the rounds. Precise to ~0.5 us.
2. Over loopback: a uvicorn server process per round, keep-alive connections from
   bench/loadgen.py; requests/s and the server's CPU per request (utime + stime, 10 ms
   ticks). Noisy on a shared 2-core machine; shown for the order of magnitude.

    python bench/http_protocol.py [--rounds 5] [--requests 2000] [--connections 4]
        [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from loadgen import build_lines, json_body, new_event_loop, post_request, run_load  # noqa: E402

SECTION = "## HTTP protocol limits (bench/http_protocol.py)"
REPLY = b'{"accepted":1000,"duplicates":0,"rejected":[]}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 202,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(REPLY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": REPLY})


class _StubTransport:
    """Just enough of an asyncio transport for the protocol: counts writes."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )


async def _in_process(protocol_cls: Any, chunks: list[bytes], count: int) -> float:
    """CPU microseconds per request through `protocol_cls`, app included."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    config = Config(app, lifespan="off", log_level="warning")
    config.load()
    protocol = protocol_cls(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = _StubTransport()
    protocol.connection_made(transport)
    started = time.process_time()
    for _ in range(count):
        answered = transport.writes + 2  # response head and body
        for chunk in chunks:
            protocol.data_received(chunk)
            await asyncio.sleep(0)
        while transport.writes < answered:
            await asyncio.sleep(0)
    return (time.process_time() - started) / count * 1e6


def in_process(request: bytes, rounds: int, count: int) -> dict[str, list[float]]:
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from metering.http.protocol import HttpLimits, protocol_class

    chunks = [request[i : i + 65536] for i in range(0, len(request), 65536)]
    classes = {"stock": HttpToolsProtocol, "limited": protocol_class(HttpLimits())}
    results: dict[str, list[float]] = {"stock": [], "limited": []}

    async def measure() -> None:
        for round_no in range(rounds):
            order = ("stock", "limited") if round_no % 2 == 0 else ("limited", "stock")
            for name in order:
                results[name].append(await _in_process(classes[name], chunks, count))

    uvloop.run(measure())
    return results


def serve(protocol: str, port: int) -> None:
    import uvicorn

    from metering.http.protocol import HttpLimits, protocol_class

    http: Any = "httptools" if protocol == "stock" else protocol_class(HttpLimits())
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=http,
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(protocol: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", protocol, "--port", str(port)], cwd=REPO
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the {protocol} server did not start") from None
            time.sleep(0.05)


def one_round(protocol: str, request: bytes, count: int, connections: int) -> dict[str, float]:
    proc, port = start_server(protocol)
    try:
        loop = new_event_loop()
        try:
            warm = [request] * 50
            loop.run_until_complete(
                run_load("127.0.0.1", port, warm, expect_accepted=[1000] * 50, concurrency=2)
            )
            cpu_before = cpu_seconds(proc.pid)
            result = loop.run_until_complete(
                run_load(
                    "127.0.0.1",
                    port,
                    [request] * count,
                    expect_accepted=[1000] * count,
                    concurrency=connections,
                )
            )
            cpu = cpu_seconds(proc.pid) - cpu_before
        finally:
            loop.close()
        if result.failures:
            raise RuntimeError(f"{protocol}: {result.failures[:3]}")
        return {"rps": result.requests / result.seconds, "cpu_us": cpu / result.requests * 1e6}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def append_results(path: Path, block: str) -> None:
    """Append `block` at the end of this bench's section (created at the end if missing)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION not in text:
        path.write_text(text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n")
        return
    start = text.index(SECTION) + len(SECTION)
    following = re.search(r"^## ", text[start:], flags=re.MULTILINE)
    end = start + following.start() if following else len(text)
    before, after = text[:end].rstrip("\n"), text[end:]
    path.write_text(f"{before}\n\n{block}\n" + (f"\n{after}" if after else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=["stock", "limited"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--micro-rounds", type=int, default=15)
    parser.add_argument("--micro-requests", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0

    lines = build_lines(1000, seed=1, run_id="http-protocol", base_epoch=time.time() - 3600)
    body = json_body(lines)
    request = post_request("127.0.0.1", 0, "token", body)
    micro = in_process(request, args.micro_rounds, args.micro_requests)
    micro_med = {name: statistics.median(values) for name, values in micro.items()}
    for name in micro:
        print(f"in process {name:8s} median {micro_med[name]:.1f} us CPU/request", flush=True)
    runs: dict[str, list[dict[str, float]]] = {"stock": [], "limited": []}
    for round_no in range(args.rounds):
        order = ("stock", "limited") if round_no % 2 == 0 else ("limited", "stock")
        for protocol in order:
            runs[protocol].append(one_round(protocol, request, args.requests, args.connections))
            figure = runs[protocol][-1]
            print(
                f"round {round_no + 1} {protocol:8s} {figure['rps']:8.0f} req/s "
                f"{figure['cpu_us']:7.1f} us CPU/request",
                flush=True,
            )
    med = {
        protocol: {key: statistics.median(r[key] for r in rounds) for key in ("rps", "cpu_us")}
        for protocol, rounds in runs.items()
    }
    extra_us = micro_med["limited"] - micro_med["stock"]
    micro_rows = [
        "| protocol | CPU per request, median (min-max) of rounds |",
        "|---|---|",
        *(
            f"| {name} | {micro_med[name]:.1f} us ({min(v):.1f}-{max(v):.1f}) |"
            for name, v in micro.items()
        ),
    ]
    rows = [
        "| protocol | requests/s (median) | server CPU per request (median) | rounds (req/s) |",
        "|---|---|---|---|",
    ]
    for protocol in ("stock", "limited"):
        each = ", ".join(f"{r['rps']:.0f}" for r in runs[protocol])
        rows.append(
            f"| {protocol} | {med[protocol]['rps']:,.0f} | {med[protocol]['cpu_us']:.1f} us "
            f"| {each} |"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    block = "\n".join(
        [
            f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit} "
            "(+ uncommitted metering/http/)",
            "",
            f"Command: `python bench/http_protocol.py --rounds {args.rounds} --requests "
            f"{args.requests} --connections {args.connections}`. Machine: nproc "
            f"{os.cpu_count()}, Python {platform.python_version()}, shared with other "
            f"sessions (load average {os.getloadavg()[0]:.1f} at the end). Body "
            f"{len(body):,} bytes (1,000 events) per request, minimal ASGI app.",
            "",
            f"In process ({args.micro_rounds} rounds of {args.micro_requests} requests, "
            "64 KiB chunks):",
            "",
            *micro_rows,
            "",
            f"Over loopback ({args.rounds} rounds of {args.requests} requests, "
            f"{args.connections} connections, one server process per round):",
            "",
            *rows,
            "",
            f"Ratio limited / stock: in-process CPU per request "
            f"{micro_med['limited'] / micro_med['stock']:.3f} ({extra_us:+.1f} us per request, "
            f"{extra_us / 1000 * 1000:+.1f} ns per event; at the ingest target's 150 requests/s "
            f"{extra_us * 150 / 1e4:+.3f} % of one core); over loopback throughput "
            f"{med['limited']['rps'] / med['stock']['rps']:.3f}, server CPU per request "
            f"{med['limited']['cpu_us'] / med['stock']['cpu_us']:.3f}.",
        ]
    )
    print(block)
    if args.results:
        append_results(args.results, block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
