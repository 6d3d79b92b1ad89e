"""What the two front ends share: building the core, the request headers, and handing dead
letters to ``on_error`` without letting a failing callback stop the worker."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Final

from metering.client.core import Core
from metering.client.records import (
    DeadLetter,
    ErrorCallback,
    Item,
    Kind,
    OnFull,
    log_dead_letter,
    logger,
)

USER_AGENT: Final = "rerank-metering-client/0.1"
JSON_HEADERS: Final = {"Content-Type": "application/json"}


class ClientBase:
    _core: Core
    _on_error: ErrorCallback

    def _make_core(
        self,
        *,
        max_batch: int,
        max_batch_bytes: int,
        flush_interval: float,
        max_buffer: int,
        on_full: OnFull,
        spill_dir: str | os.PathLike[str] | None,
        max_retries: int | None,
        backoff_base: float,
        backoff_max: float,
        on_error: ErrorCallback | None,
    ) -> None:
        self._core = Core(
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
        self._on_error = on_error if on_error is not None else log_dead_letter

    @staticmethod
    def _headers(api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT}

    def _call_on_error(self, dead: list[DeadLetter]) -> None:
        for dl in dead:
            try:
                self._on_error(dl)
            except Exception:
                logger.exception("metering: on_error callback failed")
                log_dead_letter(dl)

    def _encode_all(self, kind: Kind, records: Iterable[Mapping[str, Any]]) -> list[Item]:
        return [self._core.encode(kind, r) for r in records]
