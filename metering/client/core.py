"""The sans-IO core of the gateway client: every delivery decision, and no network I/O.

Batching (size, bytes, age), strict FIFO order per record kind, 413 splitting, retry with
exponential backoff, full jitter and ``Retry-After``, which records spill to disk and when
spill files are replayed and deleted, flush accounting and the counters all live here, once.
The two front ends (``metering.client.sync`` and ``metering.client.aio``) only add locking or
waiting and the HTTP call, and feed the answers back (``on_response`` / ``on_failure``).
The spill files' own I/O lives in ``metering.client.spill``: it is part of the delivery
guarantee, so the core drives it directly.
"""

from __future__ import annotations

import email.utils
import os
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgspec

from metering.client.records import (
    KEY_FIELD,
    SERVER_MAX_BYTES,
    SERVER_MAX_RECORDS,
    DeadLetter,
    Item,
    Kind,
    OnFull,
    decode_record,
    logger,
)
from metering.client.spill import SpillDir, SpillFile, SpillWriter
from metering.client.streams import Batch, SpillOrigin, Stream

# A Retry-After is honoured, but a misconfigured proxy must not park the client for days.
_RETRY_AFTER_CAP: Final = 300.0
_PATH: Final[dict[Kind, str]] = {"events": "/v1/events", "probes": "/v1/probes"}
_NOT_RETRYABLE: Final = frozenset({400, 401, 403})


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta or HTTP date), capped; None if unusable."""
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


class Core:
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
        self._streams: dict[Kind, Stream] = {k: Stream(k) for k in ("events", "probes")}
        self._order: list[Stream] = list(self._streams.values())
        self._rr = 0
        self._current: Batch | None = None
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
        self._spill_dir: SpillDir | None = None
        if spill_dir is not None:
            self._open_spill_dir(Path(spill_dir))

    # -- record intake ------------------------------------------------------------------------

    def encode(self, kind: Kind, record: Mapping[str, Any]) -> Item:
        """Validate the idempotency key and encode; raises instead of accepting bad input."""
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a mapping, not {type(record).__name__}")
        key_field = KEY_FIELD[kind]
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
        return Item(key, data)

    def offer(
        self, kind: Kind, items: Sequence[Item], now: float, *, may_block: bool
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

    def next_action(self, now: float) -> Batch | float | None:
        """The batch to POST now, else seconds until one may be due (None: nothing to do)."""
        cur = self._current
        if cur is not None:
            return cur if now >= cur.not_before else cur.not_before - now
        wait: float | None = None
        n = len(self._order)
        for i in range(n):
            s = self._order[(self._rr + i) % n]
            got = self._take(s, now)
            if isinstance(got, Batch):
                self._rr = (self._rr + i + 1) % n
                self._current = got
                return got
            if got is not None and (wait is None or got < wait):
                wait = got
        return wait

    @staticmethod
    def request_path(batch: Batch) -> str:
        return _PATH[batch.kind]

    def on_response(
        self,
        batch: Batch,
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
            retry_after = parse_retry_after(headers.get("retry-after"))
            self._retry(batch, now, retry_after, f"HTTP {status}", status, content)

    def on_failure(self, batch: Batch, exc: BaseException, now: float) -> None:
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
            pending: list[Item] = []
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
        if self._spill_dir is not None:
            self._spill_dir.release()

    def take_dead_letters(self) -> list[DeadLetter]:
        dead, self._dead = self._dead, []
        return dead

    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        out["pending"] = sum(s.enqueued - s.resolved for s in self._order)
        out["buffered"] = self._mem_used
        return out

    # -- internals: batching ------------------------------------------------------------------

    def _due(self, s: Stream, now: float) -> bool:
        return (
            len(s.memory) >= self._max_batch
            or s.memory_bytes + s.overhead - 1 >= self._max_batch_bytes
            or now - s.memory[0][1] >= self._flush_interval
            or self._closing
            or s.force_upto > s.resolved
            or s.spill_pending()  # spilled records are newer: memory must go first, now
            or self._mem_used >= self._max_buffer
        )

    def _take(self, s: Stream, now: float) -> Batch | float | None:
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

    def _form_memory_batch(self, s: Stream) -> Batch:
        items: list[Item] = []
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
        return Batch(s.kind, items, s.body(items), from_memory=True, origin=None)

    def _chunks(self, s: Stream, items: list[Item]) -> list[list[Item]]:
        out: list[list[Item]] = []
        cur: list[Item] = []
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

    def _split(self, batch: Batch) -> None:
        s = self._streams[batch.kind]
        mid = len(batch.items) // 2
        halves = [batch.items[:mid], batch.items[mid:]]
        if batch.origin is not None:
            batch.origin.outstanding += 1
        for part in reversed(halves):
            s.formed.appendleft(Batch(s.kind, part, s.body(part), batch.from_memory, batch.origin))
        logger.warning("metering: 413 for %d %s, splitting in two", len(batch.items), s.kind)
        self._current = None

    def _retry(
        self,
        batch: Batch,
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

    def _acknowledge(self, batch: Batch, status: int, content: bytes) -> None:
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
        key_field = KEY_FIELD[batch.kind]
        records: list[dict[str, Any]] = []
        errors: list[list[str]] = []
        for entry in rejected:
            if not isinstance(entry, dict):
                continue
            index, key = entry.get("index"), entry.get(key_field, entry.get("event_id"))
            item: Item | None = None
            if isinstance(index, int) and 0 <= index < len(batch.items):
                item = batch.items[index]
            elif isinstance(key, str):
                item = by_key.get(key)
            records.append(decode_record(item.data) if item is not None else {key_field: key})
            errs = entry.get("errors")
            errors.append([str(e) for e in errs] if isinstance(errs, list) else [])
        self._counters["rejected"] += len(records)
        self._dead.append(DeadLetter(batch.kind, "rejected", records, status, errors))

    def _resolve(self, batch: Batch) -> None:
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
        items: Sequence[Item],
        status: int | None = None,
        *,
        detail: bytes = b"",
    ) -> None:
        self._counters["dead_lettered"] += len(items)
        records = [decode_record(i.data) for i in items]
        text = detail[:2000].decode("utf-8", "replace")
        self._dead.append(DeadLetter(kind, reason, records, status, detail=text))

    # -- internals: spill files ---------------------------------------------------------------

    def _open_spill_dir(self, path: Path) -> None:
        self._spill_dir = SpillDir(path)
        for kind, sf in self._spill_dir.leftovers():
            s = self._streams[kind]
            s.recovered.append(sf)
            s.enqueued += sf.count
            self._counters["recovered"] += sf.count
        if self._counters["recovered"]:
            logger.warning(
                "metering: %d records left in %s by a previous run will be resent",
                self._counters["recovered"],
                path,
            )

    def _new_writer(self, s: Stream) -> SpillWriter:
        assert self._spill_dir is not None
        s.spill_open = self._spill_dir.new_writer(s.kind)
        return s.spill_open

    def _close_writer(self, s: Stream) -> None:
        w = s.spill_open
        assert w is not None
        s.spill_open = None
        sf = SpillDir.close_writer(w)
        if sf is not None:
            s.spill_files.append(sf)

    def _write_lines(self, s: Stream, w: SpillWriter, lines: list[bytes]) -> None:
        SpillDir.append(w, lines)
        s.enqueued += len(lines)
        self._counters["sent"] += len(lines)
        self._counters["spilled"] += len(lines)

    def _spill(self, s: Stream, items: Sequence[Item]) -> None:
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

    def _load(self, s: Stream, sf: SpillFile, *, recovered: bool) -> None:
        try:
            good, corrupt = SpillDir.read(s.kind, sf)
        except OSError:
            logger.exception("metering: cannot read spill file %s; left for the next run", sf.path)
            s.resolved += sf.count
            return
        for line in corrupt:
            self._counters["dead_lettered"] += 1
            text = line[:2000].decode("utf-8", "replace")
            self._dead.append(DeadLetter(s.kind, "corrupt_spill", [], detail=text))
        s.resolved += sf.count - len(good)
        chunks = self._chunks(s, good)
        if not chunks:
            sf.path.unlink(missing_ok=True)
            return
        origin = SpillOrigin(sf.path, len(chunks), recovered)
        for part in chunks:
            s.formed.append(Batch(s.kind, part, s.body(part), from_memory=False, origin=origin))

    def _write_abandoned(self, s: Stream, items: list[Item], after: Path | None) -> None:
        assert self._spill_dir is not None
        path = self._spill_dir.write_abandoned(s.kind, items, after)
        self._counters["spilled"] += len(items)  # but not "sent": they were counted then
        logger.warning("metering: persisted %d undelivered %s to %s", len(items), s.kind, path)
