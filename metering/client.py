"""Client library a rerank gateway embeds to ship usage events and uptime probes to metering.

Why this module exists
----------------------
Every rerank call the gateway proxies is billable: an event that never reaches the metering
service is lost revenue, an event counted twice is an overcharge, and the gateway must neither
slow down nor fail because metering is slow or down.  Doing this correctly at every call site is
hard, so it lives here, once:

* ``send`` only encodes the record and appends it to an in-memory buffer; a background worker
  (a thread for :class:`MeteringClient`, an asyncio task for :class:`AsyncMeteringClient`) posts
  batches to ``POST /v1/events`` / ``POST /v1/probes`` when a batch is full or its oldest record
  is older than ``flush_interval``.  Batches keep arrival order and stay under the server limits
  (10,000 records, 16 MiB).
* A batch that fails transiently (5xx, 429, timeouts, dropped connections) is retried *byte for
  byte* -- same ``event_id`` values, same body -- with exponential backoff, full jitter and
  ``Retry-After``.  The server deduplicates on ``event_id``/``probe_id``, so at-least-once
  delivery plus idempotent ingestion yields exactly-once counting.  The client never invents ids.
* Nothing is dropped silently.  A full buffer either blocks ``send`` (``on_full="block"``) or
  spills to fsync'd NDJSON files (``on_full="spill"``) that are replayed -- also by the next
  client started on the same ``spill_dir`` after a crash -- and deleted only once acknowledged.
  Records the server refuses (400/401/403, oversized single records, per-record ``rejected``
  entries of a 202) are handed to the ``on_error`` dead-letter callback (default: ERROR log).

Design: every decision (batching, ordering, 413 splitting, retry/backoff, spill files, flush
accounting, counters) lives in the I/O-free :class:`_Core`.  The two public clients are thin
front-ends that add only locking/waiting and the HTTP call (``httpx.Client`` in a thread vs
``httpx.AsyncClient`` in a task).

Limits worth knowing: records still in memory are lost if the process dies abruptly (use
``on_full="spill"`` plus ``close()`` on shutdown; ``close(timeout=...)`` writes what it could not
deliver to ``spill_dir`` when one is configured); one ``spill_dir`` belongs to one live client
(enforced with an ``flock``); ``on_error`` runs on the worker and must not block or call
``flush``/``close``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import email.utils
import fcntl
import logging
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import httpx
import msgspec

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "SERVER_MAX_BYTES",
    "SERVER_MAX_RECORDS",
    "AsyncMeteringClient",
    "DeadLetter",
    "ErrorCallback",
    "Kind",
    "MeteringClient",
    "OnFull",
]

logger = logging.getLogger(__name__)

Kind = Literal["events", "probes"]
OnFull = Literal["block", "spill"]

SERVER_MAX_RECORDS: Final = 10_000
SERVER_MAX_BYTES: Final = 16 * 1024 * 1024
DEFAULT_MAX_BATCH_BYTES: Final = 8 * 1024 * 1024
# A Retry-After is honoured, but a misconfigured proxy must not park the client for days.
_RETRY_AFTER_CAP: Final = 300.0
_KEY_FIELD: Final[dict[Kind, str]] = {"events": "event_id", "probes": "probe_id"}
_PATH: Final[dict[Kind, str]] = {"events": "/v1/events", "probes": "/v1/probes"}
_SPILL_NAME: Final = re.compile(r"^(events|probes)-(\d{20})-(\d{10})\.ndjson$")
_NOT_RETRYABLE: Final = frozenset({400, 401, 403})
_USER_AGENT: Final = "rerank-metering-client/0.1"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Records the client will not deliver, handed to ``on_error`` instead of being dropped.

    ``reason`` is one of ``"rejected"`` (per-record ``rejected`` entry of a 202; ``errors`` holds
    the server's messages, one list per record), ``"http_400"``, ``"http_401"``, ``"http_403"``,
    ``"too_large"`` (413 for a single record), ``"retries_exhausted"`` (``max_retries`` hit),
    ``"undelivered_on_close"`` (``close`` timed out and there is no ``spill_dir``) or
    ``"corrupt_spill"`` (an unreadable line in a spill file; ``detail`` holds its start).
    """

    kind: Kind
    reason: str
    records: list[dict[str, Any]]
    status: int | None = None
    errors: list[list[str]] = field(default_factory=list)
    detail: str = ""


ErrorCallback = Callable[[DeadLetter], None]


def _log_dead_letter(dl: DeadLetter) -> None:
    key = _KEY_FIELD[dl.kind]
    ids = [str(r.get(key)) for r in dl.records[:5]]
    more = f" (+{len(dl.records) - 5} more)" if len(dl.records) > 5 else ""
    logger.error(
        "metering: dead-lettered %d %s, reason=%s status=%s ids=%s%s errors=%s detail=%s",
        len(dl.records),
        dl.kind,
        dl.reason,
        dl.status,
        ids,
        more,
        dl.errors[:5],
        dl.detail[:500],
    )


# ---------------------------------------------------------------------------------------------
# I/O-free core (plus spill-file I/O, which is part of the delivery guarantee)
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    key: str  # event_id / probe_id
    data: bytes  # the record's JSON object, encoded once at send() time


@dataclass(slots=True)
class _SpillFile:
    path: Path
    count: int  # records in the file (non-empty lines)


@dataclass(slots=True)
class _SpillOrigin:
    path: Path
    outstanding: int  # batches from this file not yet resolved; file deleted at 0
    recovered: bool  # left by a previous run (older than anything in memory)


@dataclass(slots=True, eq=False)
class _Batch:
    kind: Kind
    items: list[_Item]
    body: bytes
    from_memory: bool
    origin: _SpillOrigin | None
    failures: int = 0
    not_before: float = 0.0


@dataclass(slots=True)
class _SpillWriter:
    path: Path
    fd: int
    count: int = 0
    nbytes: int = 0


class _Stream:
    """FIFO of one record kind: formed batches, recovered files, memory, this run's spill files."""

    def __init__(self, kind: Kind) -> None:
        self.kind: Kind = kind
        self.prefix = b'{"' + kind.encode() + b'":['
        self.overhead = len(self.prefix) + 2  # prefix + b"]}"
        self.formed: deque[_Batch] = deque()
        self.recovered: deque[_SpillFile] = deque()
        self.memory: deque[tuple[_Item, float]] = deque()
        self.memory_bytes = 0  # sum of len(data) + 1 (comma)
        self.spill_files: deque[_SpillFile] = deque()
        self.spill_open: _SpillWriter | None = None
        self.enqueued = 0  # records handed over (incl. recovered), monotonic
        self.resolved = 0  # records acknowledged or dead-lettered, monotonic, FIFO
        self.force_upto = 0  # a flush() waits until resolved >= this

    def spill_pending(self) -> bool:
        return bool(self.spill_files) or self.spill_open is not None

    def body(self, items: Sequence[_Item]) -> bytes:
        return self.prefix + b",".join(i.data for i in items) + b"]}"

    def idle(self) -> bool:
        return not (self.formed or self.recovered or self.memory or self.spill_pending())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP)


def _decode_record(data: bytes) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {"_raw": data[:1000].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {"_raw": obj}


class _Core:
    """All batching/retry/spill decisions.  Not thread-safe: front-ends serialise calls.

    Ordering per kind is strictly FIFO: recovered spill files (previous run) -> memory -> spill
    files of this run.  Once anything spilled, new records also spill until the spill queue has
    been taken by the worker, so a newer record can never overtake an older one.
    """

    def __init__(
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
    ) -> None:
        if not 1 <= max_batch <= SERVER_MAX_RECORDS:
            raise ValueError(f"max_batch must be in 1..{SERVER_MAX_RECORDS}")
        if not 1024 <= max_batch_bytes <= SERVER_MAX_BYTES:
            raise ValueError(f"max_batch_bytes must be in 1024..{SERVER_MAX_BYTES}")
        if flush_interval < 0:
            raise ValueError("flush_interval must be >= 0")
        if max_buffer < 1:
            raise ValueError("max_buffer must be >= 1")
        if on_full not in ("block", "spill"):
            raise ValueError("on_full must be 'block' or 'spill'")
        if on_full == "spill" and spill_dir is None:
            raise ValueError("on_full='spill' needs spill_dir")
        if max_retries is not None and max_retries < 0:
            raise ValueError("max_retries must be >= 0 or None")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError("backoff values must be >= 0")
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._flush_interval = flush_interval
        self._max_buffer = max_buffer
        self._on_full: OnFull = on_full
        self._max_retries = max_retries
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._rng = random.Random()
        self._streams: dict[Kind, _Stream] = {k: _Stream(k) for k in ("events", "probes")}
        self._order: list[_Stream] = list(self._streams.values())
        self._rr = 0
        self._current: _Batch | None = None
        self._mem_used = 0  # memory records not yet resolved (buffered + in flight)
        self._closing = False
        self._dead: list[DeadLetter] = []
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "sent",
                "accepted",
                "duplicates",
                "rejected",
                "dead_lettered",
                "retries",
                "spilled",
                "recovered",
            ),
            0,
        )
        self._spill_dir: Path | None = None
        self._lock_fd: int | None = None
        self._spill_seq = 0
        self._last_ns = time.time_ns()
        self._start_ns = self._last_ns
        if spill_dir is not None:
            self._open_spill_dir(Path(spill_dir))

    # -- record intake ------------------------------------------------------------------------

    def encode(self, kind: Kind, record: Mapping[str, Any]) -> _Item:
        """Validate the idempotency key and encode; raises instead of accepting bad input."""
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a mapping, not {type(record).__name__}")
        key_field = _KEY_FIELD[kind]
        key = record.get(key_field)
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"record needs a non-empty string {key_field!r}")
        rec: dict[str, Any] = dict(record)
        ts = rec.get("timestamp")
        if isinstance(ts, datetime):
            if ts.tzinfo is None or ts.utcoffset() is None:
                raise ValueError(f"{key_field}={key!r}: timestamp datetime must be tz-aware")
            rec["timestamp"] = ts.isoformat()
        data = msgspec.json.encode(rec)
        if len(data) + self._streams[kind].overhead > self._max_batch_bytes:
            raise ValueError(
                f"{key_field}={key!r}: encoded record ({len(data)} bytes) exceeds max_batch_bytes"
            )
        return _Item(key, data)

    def offer(
        self, kind: Kind, items: Sequence[_Item], now: float, *, may_block: bool
    ) -> tuple[int, bool]:
        """Take records in order; returns (how many taken, whether to wake the worker).

        Fewer than ``len(items)`` are taken only when ``on_full="block"``, the buffer is full
        and the caller may block (it then waits for progress and offers the rest).
        """
        s = self._streams[kind]
        was_empty = not s.memory
        taken = len(items)
        spill_from: int | None = None
        for i, item in enumerate(items):
            full = self._mem_used >= self._max_buffer
            if s.spill_pending() or (full and self._on_full == "spill"):
                spill_from = i
                break
            if full and may_block:
                taken = i
                break
            # (full and not may_block: called from the worker itself, e.g. inside on_error;
            # blocking would deadlock, so overshoot the buffer instead of losing the record.)
            s.memory.append((item, now))
            s.memory_bytes += len(item.data) + 1
            self._mem_used += 1
            s.enqueued += 1
            self._counters["sent"] += 1
        if spill_from is not None:
            self._spill(s, items[spill_from:])  # raises OSError if the disk fails
        wake = was_empty or spill_from is not None or (bool(s.memory) and self._due(s, now))
        return taken, wake

    # -- worker side --------------------------------------------------------------------------

    def next_action(self, now: float) -> _Batch | float | None:
        """The batch to POST now, else seconds until one may be due (None: nothing to do)."""
        cur = self._current
        if cur is not None:
            return cur if now >= cur.not_before else cur.not_before - now
        wait: float | None = None
        n = len(self._order)
        for i in range(n):
            s = self._order[(self._rr + i) % n]
            got = self._take(s, now)
            if isinstance(got, _Batch):
                self._rr = (self._rr + i + 1) % n
                self._current = got
                return got
            if got is not None and (wait is None or got < wait):
                wait = got
        return wait

    @staticmethod
    def request_path(batch: _Batch) -> str:
        return _PATH[batch.kind]

    def on_response(
        self,
        batch: _Batch,
        status: int,
        headers: Mapping[str, str],
        content: bytes,
        now: float,
    ) -> None:
        if 200 <= status < 300:
            self._acknowledge(batch, status, content)
            self._resolve(batch)
        elif status == 413:
            if len(batch.items) > 1:
                self._split(batch)
            else:
                self._dead_letter(batch.kind, "too_large", batch.items, status, detail=content)
                self._resolve(batch)
        elif status in _NOT_RETRYABLE:
            self._dead_letter(batch.kind, f"http_{status}", batch.items, status, detail=content)
            self._resolve(batch)
        else:
            # 5xx, 429, 408 and anything unexpected (e.g. a 404 from a proxy during a deploy):
            # resending the same ids is always safe, dropping would lose revenue.
            retry_after = _parse_retry_after(headers.get("retry-after"))
            self._retry(batch, now, retry_after, f"HTTP {status}", status, content)

    def on_failure(self, batch: _Batch, exc: BaseException, now: float) -> None:
        """Transport error (timeout, refused/dropped connection, ...): retry the same batch."""
        self._retry(batch, now, None, f"{type(exc).__name__}: {exc}", None, b"")

    # -- flush / close ------------------------------------------------------------------------

    def flush_target(self) -> tuple[int, ...]:
        target = tuple(s.enqueued for s in self._order)
        for s, t in zip(self._order, target, strict=True):
            s.force_upto = max(s.force_upto, t)
        return target

    def flushed(self, target: tuple[int, ...]) -> bool:
        return all(s.resolved >= t for s, t in zip(self._order, target, strict=True))

    def begin_close(self) -> None:
        self._closing = True

    def idle(self) -> bool:
        return self._current is None and all(s.idle() for s in self._order)

    def abandon(self) -> None:
        """Give up delivering (close timed out / worker died): persist or dead-letter the rest.

        Records from spill files stay in their files.  Memory records are newer than the
        spill file being sent (if any) and older than the ones not yet taken, so they are
        appended to the former, or else written to a file whose name sorts before this run's
        spill files: the next client replays them in arrival order.  Without a spill_dir they
        go to on_error.
        """
        for s in self._order:
            if s.spill_open is not None:
                self._close_writer(s)
            pending: list[_Item] = []
            taken: Path | None = None  # this run's spill file currently being sent
            batches = list(s.formed)
            if self._current is not None and self._current.kind == s.kind:
                batches.insert(0, self._current)
            for b in batches:
                if b.from_memory:
                    pending.extend(b.items)
                elif b.origin is not None and not b.origin.recovered:
                    taken = b.origin.path
            pending.extend(item for item, _ in s.memory)
            if pending and self._spill_dir is not None:
                try:
                    self._write_abandoned(s, pending, taken)
                except OSError:
                    logger.exception("metering: could not persist %d %s", len(pending), s.kind)
                    self._dead_letter(s.kind, "undelivered_on_close", pending)
            elif pending:
                self._dead_letter(s.kind, "undelivered_on_close", pending)
            s.formed.clear()
            s.recovered.clear()
            s.memory.clear()
            s.memory_bytes = 0
            s.spill_files.clear()
            s.resolved = s.enqueued
        self._current = None
        self._mem_used = 0

    def shutdown(self) -> None:
        for s in self._order:
            if s.spill_open is not None:
                self._close_writer(s)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def take_dead_letters(self) -> list[DeadLetter]:
        dead, self._dead = self._dead, []
        return dead

    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        out["pending"] = sum(s.enqueued - s.resolved for s in self._order)
        out["buffered"] = self._mem_used
        return out

    # -- internals: batching ------------------------------------------------------------------

    def _due(self, s: _Stream, now: float) -> bool:
        return (
            len(s.memory) >= self._max_batch
            or s.memory_bytes + s.overhead - 1 >= self._max_batch_bytes
            or now - s.memory[0][1] >= self._flush_interval
            or self._closing
            or s.force_upto > s.resolved
            or s.spill_pending()  # spilled records are newer: memory must go first, now
            or self._mem_used >= self._max_buffer
        )

    def _take(self, s: _Stream, now: float) -> _Batch | float | None:
        while True:
            if s.formed:
                return s.formed.popleft()
            if s.recovered:
                self._load(s, s.recovered.popleft(), recovered=True)
                continue
            if s.memory:
                if self._due(s, now):
                    return self._form_memory_batch(s)
                return max(0.0, s.memory[0][1] + self._flush_interval - now)
            if s.spill_pending():
                if not s.spill_files:
                    self._close_writer(s)  # take the file still being appended to
                self._load(s, s.spill_files.popleft(), recovered=False)
                continue
            return None

    def _form_memory_batch(self, s: _Stream) -> _Batch:
        items: list[_Item] = []
        size = s.overhead - 1
        while s.memory and len(items) < self._max_batch:
            item = s.memory[0][0]
            add = len(item.data) + 1
            if items and size + add > self._max_batch_bytes:
                break
            s.memory.popleft()
            s.memory_bytes -= add
            items.append(item)
            size += add
        return _Batch(s.kind, items, s.body(items), from_memory=True, origin=None)

    def _chunks(self, s: _Stream, items: list[_Item]) -> list[list[_Item]]:
        out: list[list[_Item]] = []
        cur: list[_Item] = []
        size = s.overhead - 1
        for item in items:
            add = len(item.data) + 1
            if cur and (len(cur) >= self._max_batch or size + add > self._max_batch_bytes):
                out.append(cur)
                cur, size = [], s.overhead - 1
            cur.append(item)
            size += add
        if cur:
            out.append(cur)
        return out

    def _split(self, batch: _Batch) -> None:
        s = self._streams[batch.kind]
        mid = len(batch.items) // 2
        halves = [batch.items[:mid], batch.items[mid:]]
        if batch.origin is not None:
            batch.origin.outstanding += 1
        for part in reversed(halves):
            s.formed.appendleft(_Batch(s.kind, part, s.body(part), batch.from_memory, batch.origin))
        logger.warning("metering: 413 for %d %s, splitting in two", len(batch.items), s.kind)
        self._current = None

    def _retry(
        self,
        batch: _Batch,
        now: float,
        retry_after: float | None,
        why: str,
        status: int | None,
        content: bytes,
    ) -> None:
        batch.failures += 1
        if self._max_retries is not None and batch.failures > self._max_retries:
            self._dead_letter(
                batch.kind, "retries_exhausted", batch.items, status, detail=why.encode()
            )
            self._resolve(batch)
            return
        self._counters["retries"] += 1
        cap = min(self._backoff_max, self._backoff_base * 2.0 ** min(batch.failures - 1, 60))
        delay = self._rng.uniform(0.0, cap)  # full jitter
        if retry_after is not None:
            delay = max(delay, retry_after)
        batch.not_before = now + delay
        log = logger.warning if batch.failures == 1 or batch.failures % 10 == 0 else logger.debug
        log(
            "metering: %d %s not delivered (%s), attempt %d, retrying in %.2fs",
            len(batch.items),
            batch.kind,
            why,
            batch.failures,
            delay,
        )

    def _acknowledge(self, batch: _Batch, status: int, content: bytes) -> None:
        try:
            body = msgspec.json.decode(content) if content else None
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict):
            logger.warning("metering: HTTP %d without a JSON summary; counting as accepted", status)
            self._counters["accepted"] += len(batch.items)
            return
        accepted, duplicates = body.get("accepted"), body.get("duplicates")
        self._counters["accepted"] += accepted if isinstance(accepted, int) else 0
        self._counters["duplicates"] += duplicates if isinstance(duplicates, int) else 0
        rejected = body.get("rejected")
        if not isinstance(rejected, list) or not rejected:
            return
        by_key = {item.key: item for item in batch.items}
        key_field = _KEY_FIELD[batch.kind]
        records: list[dict[str, Any]] = []
        errors: list[list[str]] = []
        for entry in rejected:
            if not isinstance(entry, dict):
                continue
            index, key = entry.get("index"), entry.get(key_field, entry.get("event_id"))
            item: _Item | None = None
            if isinstance(index, int) and 0 <= index < len(batch.items):
                item = batch.items[index]
            elif isinstance(key, str):
                item = by_key.get(key)
            records.append(_decode_record(item.data) if item is not None else {key_field: key})
            errs = entry.get("errors")
            errors.append([str(e) for e in errs] if isinstance(errs, list) else [])
        self._counters["rejected"] += len(records)
        self._dead.append(DeadLetter(batch.kind, "rejected", records, status, errors))

    def _resolve(self, batch: _Batch) -> None:
        s = self._streams[batch.kind]
        s.resolved += len(batch.items)
        if batch.from_memory:
            self._mem_used -= len(batch.items)
        origin = batch.origin
        if origin is not None:
            origin.outstanding -= 1
            if origin.outstanding == 0:
                try:
                    origin.path.unlink(missing_ok=True)
                except OSError:
                    logger.exception("metering: could not delete spill file %s", origin.path)
        if self._current is batch:
            self._current = None

    def _dead_letter(
        self,
        kind: Kind,
        reason: str,
        items: Sequence[_Item],
        status: int | None = None,
        *,
        detail: bytes = b"",
    ) -> None:
        self._counters["dead_lettered"] += len(items)
        records = [_decode_record(i.data) for i in items]
        text = detail[:2000].decode("utf-8", "replace")
        self._dead.append(DeadLetter(kind, reason, records, status, detail=text))

    # -- internals: spill files ---------------------------------------------------------------

    def _open_spill_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"spill_dir {path} is in use by another metering client") from None
        self._lock_fd = fd
        self._spill_dir = path
        for entry in sorted(path.iterdir(), key=lambda p: p.name):
            m = _SPILL_NAME.match(entry.name)
            if m is None:
                continue
            try:
                count = sum(1 for line in entry.read_bytes().split(b"\n") if line.strip())
            except OSError:
                logger.exception("metering: cannot read leftover spill file %s; skipping", entry)
                continue
            self._last_ns = max(self._last_ns, int(m.group(2)) + 1)
            kind: Kind = "events" if m.group(1) == "events" else "probes"
            s = self._streams[kind]
            s.recovered.append(_SpillFile(entry, count))
            s.enqueued += count
            self._counters["recovered"] += count
        self._start_ns = self._last_ns
        if self._counters["recovered"]:
            logger.warning(
                "metering: %d records left in %s by a previous run will be resent",
                self._counters["recovered"],
                path,
            )

    def _new_writer(self, s: _Stream) -> _SpillWriter:
        assert self._spill_dir is not None
        self._spill_seq += 1
        self._last_ns = max(self._last_ns, time.time_ns())
        name = f"{s.kind}-{self._last_ns:020d}-{self._spill_seq:010d}.ndjson"
        path = self._spill_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        _fsync_dir(self._spill_dir)
        w = _SpillWriter(path, fd)
        s.spill_open = w
        return w

    def _close_writer(self, s: _Stream) -> None:
        w = s.spill_open
        assert w is not None
        s.spill_open = None
        os.close(w.fd)
        if w.count:
            s.spill_files.append(_SpillFile(w.path, w.count))
        else:
            w.path.unlink(missing_ok=True)

    def _write_lines(self, s: _Stream, w: _SpillWriter, lines: list[bytes]) -> None:
        data = b"".join(lines)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(w.fd, view) :]
            os.fsync(w.fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(w.fd, w.nbytes)  # never leave a torn line behind
            raise
        w.count += len(lines)
        w.nbytes += len(data)
        s.enqueued += len(lines)
        self._counters["sent"] += len(lines)
        self._counters["spilled"] += len(lines)

    def _spill(self, s: _Stream, items: Sequence[_Item]) -> None:
        """Append to fsync'd NDJSON files, one file per would-be batch (durable on return)."""
        limit = self._max_batch_bytes - s.overhead + 1
        lines: list[bytes] = []
        nbytes = 0
        try:
            for item in items:
                add = len(item.data) + 1
                w = s.spill_open
                if (
                    w is None
                    or w.count + len(lines) >= self._max_batch
                    or (w.count + len(lines) > 0 and w.nbytes + nbytes + add > limit)
                ):
                    if w is not None:
                        self._write_lines(s, w, lines)
                        self._close_writer(s)
                    lines, nbytes = [], 0
                    self._new_writer(s)
                lines.append(item.data + b"\n")
                nbytes += add
            if lines and s.spill_open is not None:
                self._write_lines(s, s.spill_open, lines)
        except OSError:
            if s.spill_open is not None:
                self._close_writer(s)  # never append after a failed write
            raise

    def _load(self, s: _Stream, sf: _SpillFile, *, recovered: bool) -> None:
        try:
            raw = sf.path.read_bytes()
        except OSError:
            logger.exception("metering: cannot read spill file %s; left for the next run", sf.path)
            s.resolved += sf.count
            return
        key_field = _KEY_FIELD[s.kind]
        good: list[_Item] = []
        for line in raw.split(b"\n"):
            line = line.strip()
            if not line:
                continue
            try:
                rec = msgspec.json.decode(line)
            except msgspec.DecodeError:
                rec = None
            key = rec.get(key_field) if isinstance(rec, dict) else None
            if isinstance(key, str) and key:
                good.append(_Item(key, line))
            else:
                self._counters["dead_lettered"] += 1
                text = line[:2000].decode("utf-8", "replace")
                self._dead.append(DeadLetter(s.kind, "corrupt_spill", [], detail=text))
        s.resolved += sf.count - len(good)
        chunks = self._chunks(s, good)
        if not chunks:
            sf.path.unlink(missing_ok=True)
            return
        origin = _SpillOrigin(sf.path, len(chunks), recovered)
        for part in chunks:
            s.formed.append(_Batch(s.kind, part, s.body(part), from_memory=False, origin=origin))

    def _write_abandoned(self, s: _Stream, items: list[_Item], after: Path | None) -> None:
        assert self._spill_dir is not None
        path = after or self._spill_dir / f"{s.kind}-{self._start_ns:020d}-{0:010d}.ndjson"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            w = _SpillWriter(path, fd, nbytes=os.fstat(fd).st_size)
            self._write_lines(s, w, [i.data + b"\n" for i in items])
        finally:
            os.close(fd)
        _fsync_dir(self._spill_dir)
        # _write_lines counted them as newly sent/spilled; they were counted when first sent.
        s.enqueued -= len(items)
        self._counters["sent"] -= len(items)
        logger.warning("metering: persisted %d undelivered %s to %s", len(items), s.kind, path)


# ---------------------------------------------------------------------------------------------
# Front-ends
# ---------------------------------------------------------------------------------------------


class _ClientBase:
    _core: _Core
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
        self._core = _Core(
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
        self._on_error = on_error if on_error is not None else _log_dead_letter

    @staticmethod
    def _headers(api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}", "User-Agent": _USER_AGENT}

    def _call_on_error(self, dead: list[DeadLetter]) -> None:
        for dl in dead:
            try:
                self._on_error(dl)
            except Exception:
                logger.exception("metering: on_error callback failed")
                _log_dead_letter(dl)

    def _encode_all(self, kind: Kind, records: Iterable[Mapping[str, Any]]) -> list[_Item]:
        return [self._core.encode(kind, r) for r in records]


_JSON_HEADERS: Final = {"Content-Type": "application/json"}


class MeteringClient(_ClientBase):
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
        self._make_core(
            max_batch=max_batch,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            max_buffer=max_buffer,
            on_full=on_full,
            spill_dir=spill_dir,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            on_error=on_error,
        )
        self._timeout = timeout
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # worker waits here
        self._progress = threading.Condition(self._lock)  # send/flush wait here
        self._closing = False
        self._closed = False
        self._abort = False
        self._failure: BaseException | None = None
        self._close_lock = threading.Lock()
        self._clean: bool | None = None  # close() result, once closed
        try:
            self._http = httpx.Client(
                base_url=base_url,
                headers=self._headers(api_key),
                timeout=timeout,
                transport=transport,
            )
        except BaseException:
            self._core.shutdown()
            raise
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
            while not self._core.flushed(target):
                self._raise_if_failed()
                if self._closed:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._progress.wait(remaining)
            return True

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
            self._closing = True
            self._core.begin_close()
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
            if not self._core.idle():
                clean = False
                self._core.abandon()
            dead = self._core.take_dead_letters()
            self._core.shutdown()
            self._closed = True
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

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RuntimeError("metering worker died") from self._failure

    def _submit(self, kind: Kind, items: list[_Item]) -> None:
        may_block = threading.current_thread() is not self._thread
        pos = 0
        with self._lock:
            while True:
                if self._closing:
                    raise RuntimeError("metering client is closed")
                self._raise_if_failed()
                taken, wake = self._core.offer(
                    kind, items[pos:], time.monotonic(), may_block=may_block
                )
                pos += taken
                if wake:
                    self._work.notify()
                if pos >= len(items):
                    return
                self._progress.wait()

    def _next_batch(self) -> _Batch | None:
        with self._lock:
            while True:
                if self._abort:
                    return None
                act = self._core.next_action(time.monotonic())
                if isinstance(act, _Batch):
                    return act
                if self._closing and self._core.idle():
                    return None
                self._work.wait(act)

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    resp = self._http.post(
                        _Core.request_path(batch), content=batch.body, headers=_JSON_HEADERS
                    )
                except Exception as exc:
                    with self._lock:
                        self._core.on_failure(batch, exc, time.monotonic())
                else:
                    with self._lock:
                        self._core.on_response(
                            batch, resp.status_code, resp.headers, resp.content, time.monotonic()
                        )
                with self._lock:
                    dead = self._core.take_dead_letters()
                    self._progress.notify_all()
                self._call_on_error(dead)
        except BaseException as exc:
            logger.critical("metering: worker thread died", exc_info=True)
            with self._lock:
                self._failure = exc
                self._progress.notify_all()

    def _close_at_exit(self) -> None:
        self.close(timeout=max(self._timeout, 5.0))


class AsyncMeteringClient(_ClientBase):
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
        self._make_core(
            max_batch=max_batch,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            max_buffer=max_buffer,
            on_full=on_full,
            spill_dir=spill_dir,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            on_error=on_error,
        )
        self._work = asyncio.Event()
        self._progress = asyncio.Event()  # replaced on every pulse; waiters hold the old one
        self._closing = False
        self._closed = False
        self._abort = False
        self._failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._clean: bool | None = None  # aclose() result, once closed
        try:
            self._http = httpx.AsyncClient(
                base_url=base_url,
                headers=self._headers(api_key),
                timeout=timeout,
                transport=transport,
            )
        except BaseException:
            self._core.shutdown()
            raise
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
        while not self._core.flushed(target):
            self._raise_if_failed()
            if self._closed:
                return False
            pulse = self._progress
            if deadline is None:
                await pulse.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pulse.wait(), remaining)
        return True

    async def aclose(self, timeout: float | None = None) -> bool:
        """Flush, then stop the worker task; same timeout semantics as ``MeteringClient.close``."""
        if self._closing:  # closed, or another task is closing: wait for its result
            while self._clean is None:
                await self._progress.wait()
            return self._clean
        self._closing = True
        self._core.begin_close()
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
        if not self._core.idle():
            clean = False
            self._core.abandon()
        dead = self._core.take_dead_letters()
        self._core.shutdown()
        self._closed = True
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

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RuntimeError("metering worker died") from self._failure

    def _ensure_started(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metering-client")

    def _pulse(self) -> None:
        pulse, self._progress = self._progress, asyncio.Event()
        pulse.set()

    async def _submit(self, kind: Kind, items: list[_Item]) -> None:
        may_block = asyncio.current_task() is not self._task
        pos = 0
        while True:
            if self._closing:
                raise RuntimeError("metering client is closed")
            self._raise_if_failed()
            self._ensure_started()
            taken, wake = self._core.offer(kind, items[pos:], time.monotonic(), may_block=may_block)
            pos += taken
            if wake:
                self._work.set()
            if pos >= len(items):
                return
            await self._progress.wait()

    async def _next_batch(self) -> _Batch | None:
        while True:
            if self._abort:
                return None
            self._work.clear()
            act = self._core.next_action(time.monotonic())
            if isinstance(act, _Batch):
                return act
            if self._closing and self._core.idle():
                return None
            if act is None:
                await self._work.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), act)

    async def _run(self) -> None:
        try:
            while (batch := await self._next_batch()) is not None:
                try:
                    resp = await self._http.post(
                        _Core.request_path(batch), content=batch.body, headers=_JSON_HEADERS
                    )
                except Exception as exc:
                    self._core.on_failure(batch, exc, time.monotonic())
                else:
                    self._core.on_response(
                        batch, resp.status_code, resp.headers, resp.content, time.monotonic()
                    )
                self._call_on_error(self._core.take_dead_letters())
                self._pulse()
        except Exception as exc:
            logger.critical("metering: worker task died", exc_info=True)
            self._failure = exc
            self._pulse()
