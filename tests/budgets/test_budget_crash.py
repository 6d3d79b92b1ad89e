"""`kill -9` of a real `metering serve` with budgets: spend is rebuilt exactly (spool
replay included), authorize reflects it, and no threshold fires or is delivered twice."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.budgets.conftest import Receiver
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event
from tests.processes import ServerProcess

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DOLLAR = {"provider": "cohere", "model": "rerank-4-pro", "input_tokens": 4_000_000}


def _post(server: ServerProcess, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(f"{server.url}{path}", json=body, headers=H, timeout=30)
    assert r.status_code in (200, 201, 202), r.text
    return r.json()


def _spend(server: ServerProcess) -> tuple[str, bool]:
    got = _post(server, "/v1/authorize", {"tenant_id": "acct-1", "project_id": "proj-1"})
    return got["budgets"][0]["spend_usd"], got["allowed"]


def _wait_for(server: ServerProcess, receiver: Receiver, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.payloads()) < n:
        got = len(receiver.payloads())
        assert time.monotonic() < deadline, f"{got} deliveries, want {n}\n{server.log_tail()}"
        time.sleep(0.05)


def test_kill_9_rebuilds_spend_and_fires_nothing_twice(tmp_path: Path, receiver: Receiver) -> None:
    server = ServerProcess(
        tmp_path / "data",
        METERING_ADMIN_TOKEN=ADMIN_TOKEN,
        METERING_WEBHOOK_ALLOW_PRIVATE="true",
    )
    try:
        server.start()
        channel = {"type": "webhook", "url": receiver.url, "secret": "k"}
        budget = {"tenant_id": "acct-1", "amount_usd": "10", "hard_limit": True}
        _post(server, "/v1/budgets", {**budget, "channels": [channel]})
        _post(server, "/v1/events", {"events": [event(i, **DOLLAR) for i in range(6)]})
        _wait_for(server, receiver, 1)
        server.kill9()

        server.start()
        assert _spend(server) == ("6", True)
        # Right after a 202, before the writer stores it: the batch is in the spool only.
        _post(server, "/v1/events", {"events": [event(f"b{i}", **DOLLAR) for i in range(3)]})
        server.kill9()

        server.start()  # replays the spool, then rebuilds spend from ClickHouse
        assert _spend(server) == ("9", True)
        # The 0.8 alert fired before the kill or fires now; if the kill caught its delivery
        # mid-send, the row's lease (60 s) must run out before another worker may send it.
        _wait_for(server, receiver, 2, timeout=90)
        _post(server, "/v1/events", {"events": [event("c", **DOLLAR)]})
        assert _spend(server) == ("10", False)
        _wait_for(server, receiver, 3)
        server.kill9()

        server.start()
        assert _spend(server) == ("10", False)
        time.sleep(2.0)  # anything fired or delivered again would have arrived
        server.stop()
    finally:
        server.ensure_dead()
    thresholds = [p["threshold"] for p in receiver.payloads()]
    assert thresholds == [0.5, 0.8, 1.0], receiver.payloads()
