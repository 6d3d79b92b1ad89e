"""CPU per request of the service's ASGI app itself, no network: where authorize's time goes.

    python -m bench.authorize_asgi DATA_DIR ADMIN_TOKEN INGEST_KEY REQUESTS_JSON

Run by bench/authorize.py on the HTTP run's data dir once its server has stopped (chDB
allows one process per path). Builds the app as `metering serve` does (no scheduler),
waits until ready, then calls it directly with pre-built ASGI scopes, in alternating
rounds: GET /healthz (baseline) and POST /v1/authorize (the HTTP run's bodies). CPU is
`time.process_time` (this process, all threads) over each round divided by its requests;
on a shared machine this is steadier than wall time. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import MutableMapping
from typing import Any

ROUNDS = 5
PER_ROUND = 4_000


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def run(data_dir: str, admin: str, key: str, bodies: list[bytes]) -> dict[str, Any]:
    os.environ["METERING_DATA_DIR"] = data_dir
    os.environ["METERING_ADMIN_TOKEN"] = admin
    from metering.app import create_app
    from metering.settings import Settings

    app = create_app(Settings(), admin, run_scheduler=False)
    statuses: dict[int, int] = {}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1

    def receiver(body: bytes) -> Any:
        done = False

        async def receive() -> dict[str, Any]:
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)  # pragma: no cover - the app reads the body once
            return {"type": "http.disconnect"}

        return receive

    health = _scope("GET", "/healthz", [])
    auth = [
        _scope(
            "POST",
            "/v1/authorize",
            [
                (b"authorization", f"Bearer {key}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(b)).encode()),
            ],
        )
        for b in bodies
    ]
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 600
        services = app.state.services
        while not getattr(services, "ready", False):
            if time.monotonic() > deadline:
                raise TimeoutError("app not ready")
            await asyncio.sleep(0.1)
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        for n in range(500):  # warm-up
            await app(dict(health), receiver(b""), send)
            await app(dict(auth[n]), receiver(bodies[n]), send)
        statuses.clear()
        cpu: dict[str, list[float]] = {"healthz": [], "authorize": []}
        for _ in range(ROUNDS):
            began = time.process_time()
            for _ in range(PER_ROUND):
                await app(dict(health), receiver(b""), send)
            cpu["healthz"].append((time.process_time() - began) / PER_ROUND)
            began = time.process_time()
            for n in range(PER_ROUND):
                i = n % len(bodies)
                await app(dict(auth[i]), receiver(bodies[i]), send)
            cpu["authorize"].append((time.process_time() - began) / PER_ROUND)
    return {
        "healthz_us": statistics.median(cpu["healthz"]) * 1e6,
        "authorize_us": statistics.median(cpu["authorize"]) * 1e6,
        "rounds": ROUNDS,
        "per_round": PER_ROUND,
        "statuses": statuses,
    }


def main() -> int:
    data_dir, admin, key, path = sys.argv[1:5]
    with open(path) as f:
        bodies = [b.encode() for b in json.load(f)]
    out = asyncio.run(run(data_dir, admin, key, bodies))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
