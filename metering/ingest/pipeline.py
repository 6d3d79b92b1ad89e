"""One stream's ingest pipeline: gate -> spool -> writer thread -> ClickHouse.

`submit` runs on the request path: it admits the batch's keys through the dedup gate,
appends the admitted rows to the spool and returns the counts; the API then waits for
the spool's group fsync and answers 202. The writer thread drains the spool into
ClickHouse in order of arrival (main table first, then `ingested_ids`), moves the
checkpoint and tells the gate the keys are stored. After any failed or unknown insert
(a crash, a timeout) the next attempt first asks ClickHouse which rows of the batch it
already has and sends only the others, so a replay never stores a row twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from itertools import compress
from operator import attrgetter
from pathlib import Path
from typing import Any, Generic

import msgspec

from metering import metrics
from metering.ingest.gate import DedupGate
from metering.ingest.schema import Decoded, Rejected, StreamSchema, T
from metering.ingest.spool import Cursor, Record, Spool
from metering.ingest.store import IngestStore

log = logging.getLogger(__name__)

WRITER_MAX_ROWS = 200_000
WRITER_MAX_BYTES = 64 * 1024 * 1024
WRITER_IDLE_WAIT = 0.05

KeysCallback = Callable[[set[tuple[str, str]]], None]


class _Meta(msgspec.Struct, array_like=True):
    ids: list[str]
    keys: list[tuple[str, str]] = []


class _Stamp(msgspec.Struct):
    timestamp: datetime


_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(_Meta)
_stamps_decoder = msgspec.json.Decoder(list[_Stamp])
_rows_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class SubmitResult:
    accepted: int
    duplicates: int
    rejected: list[Rejected]
    durable_upto: Cursor | None


class StreamPipeline(Generic[T]):
    """Ingest of one stream (events or probes) into its ClickHouse table."""

    def __init__(
        self,
        schema: StreamSchema[T],
        store: IngestStore,
        spool_dir: Path,
        *,
        max_spool_bytes: int,
        fsync: bool,
        on_keys: KeysCallback | None = None,
        key_of: Callable[[T], tuple[str, str]] | None = None,
    ) -> None:
        self.schema = schema
        self.store = store
        self.spool = Spool(spool_dir, max_bytes=max_spool_bytes, fsync=fsync)
        self.gate = DedupGate(self._lookup, store.id_hashes)
        self._on_keys = on_keys
        self._key_of = key_of
        self._id_of = attrgetter(schema.id_field)
        self._known_keys: set[tuple[str, str]] = set()
        self._unregistered: set[tuple[str, str]] = set()
        self._appended_seq = -1
        self._stored_seq = -1
        self._next_read_seq = 0
        self._read_pos = self.spool.checkpoint
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stored_cond = threading.Condition()
        self.last_error: str | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Replay the spool tail, rebuild the gate, start the writer thread."""
        self.replay()
        self.gate.rebuild(self.store.count_ids())
        self._thread = threading.Thread(
            target=self._run, name=f"ingest-writer-{self.schema.name}", daemon=True
        )
        self._thread.start()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Drain what is spooled (up to `drain_timeout`), then stop the writer."""
        deadline = time.monotonic() + drain_timeout
        while self._stored_seq < self._appended_seq and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.01)
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        self.spool.close()

    def replay(self) -> int:
        """Store every record left in the spool by an earlier process (exactly once)."""
        replayed = 0
        while True:
            records = self.spool.read(
                self._read_pos, max_bytes=WRITER_MAX_BYTES, max_count=WRITER_MAX_ROWS
            )
            if not records:
                return replayed
            self._store(records, check=True)
            self._read_pos = records[-1].end
            replayed += sum(r.count for r in records)

    # -- request path -------------------------------------------------------------------

    def submit(self, decoded: Decoded[T]) -> SubmitResult:
        """Admit and spool a decoded batch. Raises SpoolFull (-> 503)."""
        items = [item for _, item in decoded.items]
        ids = list(map(self._id_of, items))
        with self.gate.lock:
            fresh = self.gate.admit(ids)
            if all(fresh):
                accepted, accepted_ids = items, ids
            else:
                accepted = list(compress(items, fresh))
                accepted_ids = list(compress(ids, fresh))
            durable_upto = None
            if accepted:
                keys: list[tuple[str, str]] = []
                if self._key_of is not None:
                    keys = list(set(map(self._key_of, accepted)))
                meta = _meta_encoder.encode(_Meta(accepted_ids, keys))
                data = _rows_encoder.encode_lines(accepted)
                seq, durable_upto = self.spool.append(meta, data, len(accepted))
                self.gate.mark_pending(seq, accepted_ids)
                self._appended_seq = seq
        metrics.INGEST_ITEMS.labels(self.schema.name, "accepted").inc(len(accepted))
        metrics.INGEST_ITEMS.labels(self.schema.name, "duplicate").inc(len(items) - len(accepted))
        metrics.INGEST_ITEMS.labels(self.schema.name, "rejected").inc(len(decoded.rejected))
        metrics.SPOOL_BYTES.labels(self.schema.name).set(self.spool.pending_bytes)
        self._wake.set()
        return SubmitResult(
            len(accepted), len(items) - len(accepted), decoded.rejected, durable_upto
        )

    def sync(self, upto: Cursor | None) -> None:
        """Block until the spool is durable up to `upto` (group fsync)."""
        self.spool.sync(upto if upto is not None else Cursor(-1, -1))

    # -- read barrier -------------------------------------------------------------------

    @property
    def lag(self) -> int:
        """Spooled records not yet stored in ClickHouse."""
        return self._appended_seq - self._stored_seq

    def wait_stored(self, timeout: float = 10.0) -> bool:
        """Block until everything accepted before the call is in ClickHouse."""
        target = self._appended_seq
        with self._stored_cond:
            return self._stored_cond.wait_for(lambda: self._stored_seq >= target, timeout)

    async def barrier(self, timeout: float = 10.0) -> bool:
        """Async form of wait_stored, for request handlers."""
        target = self._appended_seq
        deadline = time.monotonic() + timeout
        delay = 0.001
        while self._stored_seq < target:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    # -- writer -------------------------------------------------------------------------

    def _lookup(self, ids: list[str]) -> set[str]:
        metrics.GATE_LOOKUPS.labels(self.schema.name).inc()
        return self.store.existing_ids(ids)

    def _run(self) -> None:
        check = False
        backoff = 0.1
        while not self._stopping.is_set():
            records = self.spool.read(
                self._read_pos, max_bytes=WRITER_MAX_BYTES, max_count=WRITER_MAX_ROWS
            )
            if not records:
                self._register_keys(set())
                self._wake.wait(WRITER_IDLE_WAIT)
                self._wake.clear()
                continue
            try:
                self._store(records, check=check)
            except Exception as exc:
                metrics.STORE_FAILURES.labels(self.schema.name).inc()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "storing %s failed, retrying in %.1fs: %s",
                    self.schema.name,
                    backoff,
                    self.last_error,
                )
                check = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            check = False
            backoff = 0.1
            self.last_error = None
            self._read_pos = records[-1].end
            last_seq = self._next_read_seq + len(records) - 1
            self._next_read_seq = last_seq + 1
            self.gate.stored(last_seq)
            with self._stored_cond:
                self._stored_seq = last_seq
                self._stored_cond.notify_all()
            metrics.SPOOL_BYTES.labels(self.schema.name).set(self.spool.pending_bytes)

    def _store(self, records: list[Record], *, check: bool) -> None:
        started = time.perf_counter()
        ids: list[str] = []
        keys: set[tuple[str, str]] = set()
        for record in records:
            meta = _meta_decoder.decode(record.meta)
            ids.extend(meta.ids)
            keys.update(meta.keys)
        payload = b"".join(record.data for record in records)
        if check:
            payload = self._without_stored_rows(ids, payload)
        self.store.insert_rows(payload)
        self.store.insert_ids(ids)
        self._register_keys(keys)
        self.spool.commit(records[-1].end, sum(record.size for record in records))
        metrics.STORED_ROWS.labels(self.schema.name).inc(len(ids))
        metrics.STORE_SECONDS.labels(self.schema.name).observe(time.perf_counter() - started)

    def _without_stored_rows(self, ids: list[str], payload: bytes) -> bytes:
        """Drop the rows ClickHouse already has (after a crash or an unknown outcome)."""
        lines = payload.splitlines()
        stamps = _stamps_decoder.decode(b"[" + b",".join(lines) + b"]")
        present = self.store.existing_in_table(ids, [s.timestamp for s in stamps])
        if not present:
            return payload
        kept = [line for line, i in zip(lines, ids, strict=True) if i not in present]
        return b"".join(line + b"\n" for line in kept)

    def _register_keys(self, keys: set[tuple[str, str]]) -> None:
        """Register tenants/projects seen for the first time; retried until it works."""
        if self._on_keys is None:
            return
        new = (keys - self._known_keys) | self._unregistered
        if not new:
            return
        try:
            self._on_keys(new)
        except Exception as exc:
            log.warning("registering %d tenant/project pairs failed: %s", len(new), exc)
            self._unregistered = new
            return
        self._unregistered = set()
        self._known_keys |= new
        if len(self._known_keys) > 1_000_000:
            self._known_keys = set(new)

    def status(self) -> dict[str, Any]:
        return {
            "pending_bytes": self.spool.pending_bytes,
            "lag_records": self.lag,
            "pending_keys": self.gate.pending_count,
            "last_error": self.last_error,
        }
