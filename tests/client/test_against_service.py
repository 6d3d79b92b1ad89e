"""The gateway client against the real service (not a fake): a `metering serve` process
on loopback over a temporary data dir, events dated relative to now.

The client sends N events, some of them twice (the gateway retrying a call it had
already reported), while the transport loses every third response after the server has
answered it, so the client retries those batches byte for byte. The server must store
exactly the sent set, each event once, and the client must have every event answered
as accepted or duplicate. Sync and async clients alike.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from metering.client import AsyncMeteringClient, MeteringClient
from tests.processes import ServerProcess, read_store

ADMIN_TOKEN = "client-contract-admin-token"
EVENTS = 3_000
RESENT = 600  # events the gateway reports a second time
WAIT = 120.0  # bound of every flush and close


class LosesResponses(httpx.BaseTransport):
    """Forwards every request; every third response is dropped after the server answered
    it, as a connection reset would (the client must retry, the server deduplicate)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.calls = itertools.count(1)
        self.lost = 0
        self.lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        with self.lock:
            lose = next(self.calls) % 3 == 0
            self.lost += lose
        if lose:
            response.read()
            response.close()
            raise httpx.ReadError("connection reset after the server answered", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


class AsyncLosesResponses(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.calls = itertools.count(1)
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if next(self.calls) % 3 == 0:
            self.lost += 1
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("connection reset after the server answered", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def events(prefix: str) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {
            "event_id": f"{prefix}-{i:05d}",
            "timestamp": (now - timedelta(minutes=30, milliseconds=-i)).isoformat(),
            "tenant_id": f"acct-{i % 7}",
            "project_id": f"proj-{i % 3}",
            "provider": ("cohere", "voyage", "jina")[i % 3],
            "model": "rerank-4-pro",
            "status": "ok" if i % 50 else "error",
            "documents": 1 + i % 200,
            "input_tokens": 100 + i,
            "latency_ms": 30.0 + i % 900,
        }
        for i in range(EVENTS)
    ]


def with_resends(sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events in order, with RESENT of them reported again a little later."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(sent):
        out.append(item)
        if i >= 250 and (i - 250) % 4 == 0 and (i - 250) // 4 < RESENT:
            out.append(sent[i - 250])
    assert len(out) == EVENTS + RESENT
    return out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "data", METERING_ADMIN_TOKEN=ADMIN_TOKEN)
    try:
        proc.start()
        yield proc
    finally:
        proc.ensure_dead()


def assert_stored_exactly(server: ServerProcess, sent: list[dict[str, Any]], tmp: Path) -> None:
    server.stop()
    ids_file = tmp / "stored_ids.txt"
    counts = read_store(server.data_dir, ids_file)
    assert counts["rows"] == counts["distinct"] == counts["ids_final"] == EVENTS, counts
    assert set(ids_file.read_text().split()) == {e["event_id"] for e in sent}


def test_sync_client_counts_each_event_once(server: ServerProcess, tmp_path: Path) -> None:
    sent = events("sync")
    transport = LosesResponses()
    client = MeteringClient(
        server.url,
        ADMIN_TOKEN,
        max_batch=250,
        flush_interval=0.05,
        backoff_base=0.01,
        backoff_max=0.2,
        transport=transport,
    )
    try:
        for item in with_resends(sent):
            client.send(item)
        assert client.flush(timeout=WAIT), client.stats()
    finally:
        assert client.close(timeout=WAIT)
    stats = client.stats()
    assert transport.lost > 0 and stats["retries"] >= transport.lost, (transport.lost, stats)
    # Each record sent is answered once, by the last attempt of its batch: accepted, or a
    # duplicate (a resent event, or a batch whose first answer was lost).
    assert stats["accepted"] + stats["duplicates"] == EVENTS + RESENT, stats
    assert stats["accepted"] < EVENTS, stats  # some first answers were lost
    assert stats["rejected"] == stats["dead_lettered"] == 0, stats
    assert_stored_exactly(server, sent, tmp_path)


def test_async_client_counts_each_event_once(server: ServerProcess, tmp_path: Path) -> None:
    sent = events("async")
    transport = AsyncLosesResponses()

    async def main() -> dict[str, int]:
        client = AsyncMeteringClient(
            server.url,
            ADMIN_TOKEN,
            max_batch=250,
            flush_interval=0.05,
            backoff_base=0.01,
            backoff_max=0.2,
            transport=transport,
        )
        try:
            for item in with_resends(sent):
                await client.send(item)
            assert await client.flush(timeout=WAIT), client.stats()
        finally:
            assert await client.aclose(timeout=WAIT)
        return client.stats()

    stats = asyncio.run(asyncio.wait_for(main(), WAIT * 2))
    assert transport.lost > 0 and stats["retries"] >= transport.lost, (transport.lost, stats)
    # Each record sent is answered once, by the last attempt of its batch: accepted, or a
    # duplicate (a resent event, or a batch whose first answer was lost).
    assert stats["accepted"] + stats["duplicates"] == EVENTS + RESENT, stats
    assert stats["accepted"] < EVENTS, stats  # some first answers were lost
    assert stats["rejected"] == stats["dead_lettered"] == 0, stats
    assert_stored_exactly(server, sent, tmp_path)
