"""What the two front ends share: their state, and every step between two waits.

``sync.py`` (a thread, a lock and conditions) and ``aio.py`` (a task and events) differ only
in how they wait and how they make the HTTP call. Everything they decide in between --
whether a send may go on, what a flush or the worker does next, how an answer reaches the
core, how a close ends -- is written here once, on the sans-IO core, so the two cannot
drift apart. None of it blocks or does I/O; the sync front end calls it under its lock.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

import httpx

from metering.client.core import Core
from metering.client.records import (
    DeadLetter,
    ErrorCallback,
    Item,
    Kind,
    log_dead_letter,
    logger,
)
from metering.client.streams import Batch

USER_AGENT: Final = "rerank-metering-client/0.1"
JSON_HEADERS: Final = {"Content-Type": "application/json"}
_T = TypeVar("_T")


class Stop(enum.Enum):
    """The worker's next step when there is nothing left for it to do."""

    STOP = enum.auto()


STOP: Final = Stop.STOP


class ClientBase:
    """State and decisions shared by :class:`MeteringClient` and :class:`AsyncMeteringClient`."""

    def __init__(self, core: Core, on_error: ErrorCallback | None) -> None:
        self._core = core
        self._on_error: ErrorCallback = on_error if on_error is not None else log_dead_letter
        self._closing = False  # close began: no more sends
        self._closed = False  # close ended: the core is shut down
        self._abort = False  # close timed out: the worker stops at its next step
        self._failure: BaseException | None = None  # what killed the worker
        self._clean: bool | None = None  # the close result, once closed

    def _open(self, make: Callable[[], _T]) -> _T:
        """``make()`` (the HTTP client); if it fails, the core (and its spill dir lock) is
        released before the error propagates."""
        try:
            return make()
        except BaseException:
            self._core.shutdown()
            raise

    @staticmethod
    def _headers(api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT}

    # -- sending ------------------------------------------------------------------------------

    def _encode_all(self, kind: Kind, records: Iterable[Mapping[str, Any]]) -> list[Item]:
        return [self._core.encode(kind, r) for r in records]

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RuntimeError("metering worker died") from self._failure

    def _offer(self, kind: Kind, items: list[Item], pos: int, may_block: bool) -> tuple[int, bool]:
        """Hand ``items[pos:]`` to the core: the new position, and whether to wake the worker.
        The caller waits for progress and calls again until the position reaches the end."""
        if self._closing:
            raise RuntimeError("metering client is closed")
        self._raise_if_failed()
        taken, wake = self._core.offer(kind, items[pos:], time.monotonic(), may_block=may_block)
        return pos + taken, wake

    def _flush_step(
        self, target: tuple[int, ...], deadline: float | None
    ) -> tuple[bool | None, float | None]:
        """What a flush towards ``target`` does next: ``(result, None)`` when it is over
        (True: all resolved; False: closed, or ``deadline`` passed), else ``(None, wait)``
        with the seconds to wait for progress (None: no limit)."""
        if self._core.flushed(target):
            return True, None
        self._raise_if_failed()
        if self._closed:
            return False, None
        if deadline is None:
            return None, None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, None
        return None, remaining

    # -- the worker ---------------------------------------------------------------------------

    def _worker_step(self) -> Batch | Stop | float | None:
        """The worker's next step: a batch to post, STOP, or the seconds to wait for work
        (None: until woken)."""
        if self._abort:
            return STOP
        act = self._core.next_action(time.monotonic())
        if not isinstance(act, Batch) and self._closing and self._core.idle():
            return STOP
        return act

    def _settle(self, batch: Batch, answer: httpx.Response | Exception) -> list[DeadLetter]:
        """Feed the outcome of posting ``batch`` to the core; return the dead letters that
        are now due to ``on_error`` (call :meth:`_call_on_error` with them, unlocked)."""
        now = time.monotonic()
        if isinstance(answer, Exception):
            self._core.on_failure(batch, answer, now)
        else:
            self._core.on_response(batch, answer.status_code, answer.headers, answer.content, now)
        return self._core.take_dead_letters()

    def _call_on_error(self, dead: list[DeadLetter]) -> None:
        for dl in dead:
            try:
                self._on_error(dl)
            except Exception:
                logger.exception("metering: on_error callback failed")
                log_dead_letter(dl)

    # -- closing ------------------------------------------------------------------------------

    def _begin_close(self) -> None:
        self._closing = True
        self._core.begin_close()

    def _end_close(self, clean: bool) -> tuple[bool, list[DeadLetter]]:
        """After the worker stopped: abandon what is left (spilled if a spill dir is
        configured, else dead-lettered), shut the core down. Returns whether everything was
        delivered, and the dead letters for ``on_error``."""
        if not self._core.idle():
            clean = False
            self._core.abandon()
        dead = self._core.take_dead_letters()
        self._core.shutdown()
        self._closed = True
        return clean, dead
