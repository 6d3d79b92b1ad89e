"""The asyncio gateway client: same behaviour as the synchronous one, on one event loop.

``send`` is a coroutine that returns once the record is buffered; a task posts the batches
with ``httpx.AsyncClient``. No locks: the core is only touched from the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import httpx

from metering.client.core import Core
from metering.client.frontend import JSON_HEADERS, STOP, ClientBase
from metering.client.records import (
    DEFAULT_MAX_BATCH_BYTES,
    ErrorCallback,
    Item,
    Kind,
    OnFull,
    logger,
)
from metering.client.streams import Batch


class AsyncMeteringClient(ClientBase):
    """asyncio client with the same behaviour as :class:`MeteringClient`.

    The worker task starts on construction inside a running loop, otherwise on first use
    (``send``/``flush``/``async with``).  Use it from one event loop only.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_batch: int = 1000,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        flush_interval: float = 1.0,
        max_buffer: int = 100_000,
        on_full: OnFull = "block",
        spill_dir: str | os.PathLike[str] | None = None,
        max_retries: int | None = None,
        backoff_base: float = 0.2,
        backoff_max: float = 30.0,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        on_error: ErrorCallback | None = None,
    ) -> None:
        core = Core(
            max_batch=max_batch,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            max_buffer=max_buffer,
            on_full=on_full,
            spill_dir=spill_dir,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
        )
        super().__init__(core, on_error)
        self._work = asyncio.Event()
        self._progress = asyncio.Event()  # replaced on every pulse; waiters hold the old one
        self._task: asyncio.Task[None] | None = None
        self._http = self._open(
            lambda: httpx.AsyncClient(
                base_url=base_url,
                headers=self._headers(api_key),
                timeout=timeout,
                transport=transport,
            )
        )
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            self._ensure_started()

    # -- public API ---------------------------------------------------------------------------

    async def send(self, event: Mapping[str, Any]) -> None:
        """Buffer one usage event (needs a non-empty ``event_id``)."""
        await self._submit("events", [self._core.encode("events", event)])

    async def send_many(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Buffer events in order; all are validated before any is taken."""
        await self._submit("events", self._encode_all("events", events))

    async def send_probe(self, probe: Mapping[str, Any]) -> None:
        """Buffer one uptime probe (needs a non-empty ``probe_id``); goes to /v1/probes."""
        await self._submit("probes", [self._core.encode("probes", probe)])

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over so far is acknowledged or dead-lettered."""
        self._raise_if_failed()
        self._ensure_started()
        deadline = None if timeout is None else time.monotonic() + timeout
        target = self._core.flush_target()
        self._work.set()
        while True:
            result, wait = self._flush_step(target, deadline)
            if result is not None:
                return result
            await _wait(self._progress, wait)

    async def aclose(self, timeout: float | None = None) -> bool:
        """Flush, then stop the worker task; same timeout semantics as ``MeteringClient.close``."""
        if self._closing:  # closed, or another task is closing: wait for its result
            while self._clean is None:
                await self._progress.wait()
            return self._clean
        self._begin_close()
        clean = True
        if self._task is None and not self._core.idle():
            self._ensure_started()
        if self._task is not None:
            self._work.set()
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                clean = False
                self._abort = True
                self._task.cancel()  # interrupts the in-flight request; the batch stays current
                await asyncio.wait({self._task})
        clean, dead = self._end_close(clean)
        self._clean = clean
        self._pulse()
        self._call_on_error(dead)
        await self._http.aclose()
        return clean

    def stats(self) -> dict[str, int]:
        """Same counters as :meth:`MeteringClient.stats`."""
        return self._core.stats()

    async def __aenter__(self) -> Self:
        self._ensure_started()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metering-client")

    def _pulse(self) -> None:
        pulse, self._progress = self._progress, asyncio.Event()
        pulse.set()

    async def _submit(self, kind: Kind, items: list[Item]) -> None:
        may_block = asyncio.current_task() is not self._task
        pos = 0
        while True:
            self._ensure_started()
            pos, wake = self._offer(kind, items, pos, may_block)
            if wake:
                self._work.set()
            if pos >= len(items):
                return
            await self._progress.wait()

    async def _next_batch(self) -> Batch | None:
        while True:
            self._work.clear()
            act = self._worker_step()
            if act is STOP:
                return None
            if isinstance(act, Batch):
                return act
            await _wait(self._work, act)

    async def _run(self) -> None:
        try:
            while (batch := await self._next_batch()) is not None:
                answer: httpx.Response | Exception
                try:
                    answer = await self._http.post(
                        Core.request_path(batch), content=batch.body, headers=JSON_HEADERS
                    )
                except Exception as exc:
                    answer = exc
                self._call_on_error(self._settle(batch, answer))
                self._pulse()
        except Exception as exc:
            logger.critical("metering: worker task died", exc_info=True)
            self._failure = exc
            self._pulse()


async def _wait(event: asyncio.Event, timeout: float | None) -> None:
    """Until ``event`` is set, or ``timeout`` seconds passed (None: no limit)."""
    if timeout is None:
        await event.wait()
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
