"""The synchronous gateway client: ``send`` buffers, a daemon thread posts the batches.

Thread-safe: any thread may send; one lock serialises calls into the sans-IO core, and
conditions wake the worker (new work) and the senders (progress, for ``flush`` and a full
buffer with ``on_full="block"``). ``close`` is registered with ``atexit`` so an interpreter
that exits normally still delivers, or spills, what it buffered.
"""

from __future__ import annotations

import atexit
import os
import threading
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


class MeteringClient(ClientBase):
    """Thread-safe synchronous client; a daemon thread does the network I/O.

    ``send``/``send_many``/``send_probe`` validate and buffer (raising ``ValueError``/
    ``TypeError`` on a missing id or unencodable record, ``OSError`` if spilling fails -- the
    records may then be partially taken; resending them is safe because ids deduplicate).
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
        transport: httpx.BaseTransport | None = None,
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
        self._timeout = timeout
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # worker waits here
        self._progress = threading.Condition(self._lock)  # send/flush wait here
        self._close_lock = threading.Lock()  # a second close() waits for the first
        self._http = self._open(
            lambda: httpx.Client(
                base_url=base_url,
                headers=self._headers(api_key),
                timeout=timeout,
                transport=transport,
            )
        )
        self._thread = threading.Thread(target=self._run, name="metering-client", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    # -- public API ---------------------------------------------------------------------------

    def send(self, event: Mapping[str, Any]) -> None:
        """Buffer one usage event (needs a non-empty ``event_id``)."""
        self._submit("events", [self._core.encode("events", event)])

    def send_many(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Buffer events in order; all are validated before any is taken."""
        self._submit("events", self._encode_all("events", events))

    def send_probe(self, probe: Mapping[str, Any]) -> None:
        """Buffer one uptime probe (needs a non-empty ``probe_id``); goes to /v1/probes."""
        self._submit("probes", [self._core.encode("probes", probe)])

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything handed over so far is acknowledged or dead-lettered.

        Returns False if ``timeout`` expired first.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("flush() cannot be called from the on_error callback")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._core.flush_target()
            self._work.notify()
            while True:
                result, wait = self._flush_step(target, deadline)
                if result is not None:
                    return result
                self._progress.wait(wait)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the worker.  Idempotent.

        With ``timeout``, gives up after that long (plus at most one in-flight request):
        undelivered memory records are written to ``spill_dir`` if configured, otherwise
        dead-lettered as ``undelivered_on_close``.  Returns True if everything was delivered.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("close() cannot be called from the on_error callback")
        with self._close_lock:  # a second caller waits for the first and gets its result
            if self._clean is None:
                self._clean = self._close(timeout)
            return self._clean

    def _close(self, timeout: float | None) -> bool:
        with self._lock:
            self._begin_close()
            self._work.notify()
        atexit.unregister(self._close_at_exit)
        self._thread.join(timeout)
        clean = not self._thread.is_alive()
        if not clean:
            with self._lock:
                self._abort = True
                self._work.notify()
            self._thread.join()
        with self._lock:
            clean, dead = self._end_close(clean)
            self._progress.notify_all()
        self._call_on_error(dead)
        self._http.close()
        return clean

    def stats(self) -> dict[str, int]:
        """Counters: sent (records handed over), accepted, duplicates, rejected, dead_lettered
        (all records given to on_error, incl. rejected ones), retries, spilled, recovered
        (records found in spill_dir at start), pending (not yet resolved), buffered (in memory).
        """
        with self._lock:
            return self._core.stats()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _submit(self, kind: Kind, items: list[Item]) -> None:
        may_block = threading.current_thread() is not self._thread
        pos = 0
        with self._lock:
            while True:
                pos, wake = self._offer(kind, items, pos, may_block)
                if wake:
                    self._work.notify()
                if pos >= len(items):
                    return
                self._progress.wait()

    def _next_batch(self) -> Batch | None:
        with self._lock:
            while True:
                act = self._worker_step()
                if act is STOP:
                    return None
                if isinstance(act, Batch):
                    return act
                self._work.wait(act)

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                answer: httpx.Response | Exception
                try:
                    answer = self._http.post(
                        Core.request_path(batch), content=batch.body, headers=JSON_HEADERS
                    )
                except Exception as exc:
                    answer = exc
                with self._lock:
                    dead = self._settle(batch, answer)
                    self._progress.notify_all()
                self._call_on_error(dead)
        except BaseException as exc:
            logger.critical("metering: worker thread died", exc_info=True)
            with self._lock:
                self._failure = exc
                self._progress.notify_all()

    def _close_at_exit(self) -> None:
        self.close(timeout=max(self._timeout, 5.0))
