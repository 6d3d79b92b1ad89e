"""What the read endpoints need of the running service (the `AnalyticsState` protocol),
and a small pool of ClickHouse clients for reads.

Reads run while ingest writes. One clickhouse-connect client serializes its calls (chDB)
or shares one HTTP session (a server, where a session allows one query at a time), so
reads get clients of their own, one per concurrent read, made without session ids.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Protocol, cast

from clickhouse_connect.driver.client import Client
from fastapi import Depends, Request

from billing.prices.book import PriceBookCache
from metering.analytics.hours_cache import HoursCache
from metering.errors import ApiError

FRESHNESS_WAIT = 5.0  # seconds a read waits for events accepted before it to be stored


class Barrier(Protocol):
    async def barrier(self, timeout: float = 10.0) -> bool: ...


class ReadPool:
    """Up to `size` ClickHouse clients, made on first use and reused."""

    def __init__(self, connect: Callable[[], Client], size: int = 4) -> None:
        self._connect = connect
        self._free: queue.LifoQueue[Client] = queue.LifoQueue()
        self._made = 0
        self._size = size
        self._all: list[Client] = []

    @contextmanager
    def client(self) -> Iterator[Client]:
        try:
            client = self._free.get_nowait()
        except queue.Empty:
            if self._made < self._size:
                self._made += 1
                try:
                    client = self._connect()
                except Exception:
                    self._made -= 1
                    raise
                self._all.append(client)
            else:
                client = self._free.get(timeout=30)
        try:
            yield client
        finally:
            self._free.put(client)

    def close(self) -> None:
        for client in self._all:
            client.close()


class AnalyticsState(Protocol):
    """What the read endpoints need of the running service."""

    @property
    def reads(self) -> ReadPool: ...

    @property
    def prices(self) -> PriceBookCache: ...

    @property
    def hours(self) -> HoursCache: ...

    @property
    def events(self) -> Barrier: ...

    @property
    def probes(self) -> Barrier: ...


async def analytics_state(request: Request) -> AnalyticsState:
    return cast(AnalyticsState, request.app.state.services)


AnalyticsStateDep = Annotated[AnalyticsState, Depends(analytics_state)]


async def fresh(state: AnalyticsState) -> None:
    """Wait (up to FRESHNESS_WAIT) until every event and probe accepted before this call
    is stored, so a figure reflects all of them; 503 if the writer is that far behind."""
    for pipeline in (state.events, state.probes):
        if not await pipeline.barrier(FRESHNESS_WAIT):
            raise ApiError(
                503,
                "ingest: events accepted before this request are not stored yet; retry",
                {"Retry-After": "1"},
            )
