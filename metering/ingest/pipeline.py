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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import compress
from operator import attrgetter
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from metering import metrics
from metering.ingest.decode import Decoded, Rejected, StreamSchema, T
from metering.ingest.gate import DedupGate, key_hashes
from metering.ingest.spool import Cursor, Record, Spool, Ticket, Unavailable
from metering.ingest.store import IngestStore

log = logging.getLogger(__name__)
T_contra = TypeVar("T_contra", contravariant=True)


def _array_body(array: bytes) -> memoryview:
    """The inside of a JSON array, without copying: b'[{..},{..}]' -> b'{..},{..}'."""
    start = 0
    end = len(array)
    while array[start] in b" \t\r\n":
        start += 1
    while array[end - 1] in b" \t\r\n":
        end -= 1
    return memoryview(array)[start + 1 : end - 1]


WRITER_MAX_ROWS = 200_000
WRITER_MAX_BYTES = 64 * 1024 * 1024
WRITER_IDLE_WAIT = 0.05

KeysCallback = Callable[[set[tuple[str, str]]], None]


class AdmissionHook(Protocol[T_contra]):
    """Told about every admitted batch (the budgets' spend ledger).

    `prepare` runs on the request path after admission, outside the gate's lock, and
    returns what `durable` needs (or None: nothing to tell). `durable(seq, prepared)`
    runs once the batch's spool write has succeeded, before its 202 can leave, on the
    spool's appender thread or the caller's: it must be quick and must not block."""

    def prepare(self, items: Sequence[T_contra]) -> Any | None: ...

    def durable(self, seq: int, prepared: Any) -> None: ...


class _Meta(msgspec.Struct, array_like=True):
    ids: list[str]
    keys: list[tuple[str, str]] = []
    # The record's number in this process (submit order); records whose write failed
    # leave gaps, so the writer must not count records to know which keys it stored.
    seq: int = -1


_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(_Meta)
_rows_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class SubmitResult:
    accepted: int
    duplicates: int
    rejected: list[Rejected]
    ticket: Ticket | None  # the spool write of the accepted rows (None: nothing new)
    seq: int
    admitted: _Admitted | None = None  # tells the admission hook, once durable


class _Admitted:
    """Hands a durable batch to the admission hook exactly once, and before its 202.

    The spool's ticket runs its callbacks after it wakes waiters, so the callback alone
    could run after the request already answered; the request path therefore also calls
    `settle` once its wait returned, and whichever comes first applies it while the
    other waits for that to finish."""

    __slots__ = ("_applied", "_claim", "hook", "prepared", "seq")

    def __init__(self, hook: AdmissionHook[Any], seq: int, prepared: Any) -> None:
        self.hook = hook
        self.seq = seq
        self.prepared = prepared
        self._claim = threading.Lock()
        self._applied = threading.Event()

    def on_written(self, ticket: Ticket) -> None:
        if ticket.error is None:
            self.settle()

    def settle(self) -> None:
        if self._claim.acquire(blocking=False):
            try:
                self.hook.durable(self.seq, self.prepared)
            finally:
                self._applied.set()
        else:
            self._applied.wait(5.0)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class StreamPipeline(Generic[T]):
    """Ingest of one stream (events or probes) into its ClickHouse table."""

    def __init__(
        self,
        schema: StreamSchema[T],
        spool_dir: Path,
        *,
        max_spool_bytes: int,
        fsync: bool,
        on_keys: KeysCallback | None = None,
        key_of: Callable[[T], tuple[str, str]] | None = None,
        store: IngestStore | None = None,
        admission: AdmissionHook[T] | None = None,
    ) -> None:
        self.schema = schema
        self.admission = admission
        # The ClickHouse side may come later (`start(store)`): the spool opens without
        # it, so a process whose ClickHouse is not reachable yet still starts.
        self._ingest_store = store
        self.spool = Spool(spool_dir, max_bytes=max_spool_bytes, fsync=fsync)
        self.gate = DedupGate(self._lookup, lambda: self.store.id_hashes())
        self._on_keys = on_keys
        self._key_of = key_of
        self._id_of = attrgetter(schema.id_field)
        self._known_keys: set[tuple[str, str]] = set()
        self._appended_seq = -1
        self._stored_seq = -1
        self._read_pos = self.spool.checkpoint
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stored_cond = threading.Condition()
        self._lost: set[int] = set()  # seqs whose spool write failed (never acknowledged)
        self._last_ticket: Ticket | None = None
        self.last_error: str | None = None
        # The writer stores no record after this seq while it is set (`hold`).
        self._hold: int | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def store(self) -> IngestStore:
        if self._ingest_store is None:
            raise Unavailable(f"{self.schema.name}: not connected to ClickHouse yet")
        return self._ingest_store

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, store: IngestStore | None = None) -> None:
        """Replay the spool tail, rebuild the gate, start the writer thread. If this
        raises (ClickHouse went away), calling it again resumes the replay."""
        if store is not None:
            self._ingest_store = store
        self.replay()
        self.gate.rebuild(self.store.count_ids())
        self._thread = threading.Thread(
            target=self._run, name=f"ingest-writer-{self.schema.name}", daemon=True
        )
        self._thread.start()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Drain what is spooled (up to `drain_timeout`), then stop the writer and close
        the spool (a pipeline that never started only closes its spool)."""
        deadline = time.monotonic() + drain_timeout
        while (
            self._thread is not None
            and self._stored_seq < self._appended_seq
            and time.monotonic() < deadline
        ):
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
            count = sum(r.count for r in records)
            metrics.SPOOL_REPLAYED.labels(self.schema.name).inc(count)
            replayed += count

    # -- request path -------------------------------------------------------------------

    def submit(self, decoded: Decoded[T]) -> SubmitResult:
        """Admit and spool a decoded batch. Raises SpoolFull (-> 503). Thread-safe: the
        routes call it on the event loop for small batches, in a decode thread for
        large ones. Work that needs no lock (ids, their hashes, the batch's tenant keys)
        is done before taking the gate's lock, which a small batch on the loop may wait
        for."""
        items = decoded.items
        ids = list(map(self._id_of, items))
        hashes = key_hashes(ids)
        all_keys: list[tuple[str, str]] = []
        if self._key_of is not None:
            all_keys = list(set(map(self._key_of, items)))
        with self.gate.lock:
            fresh = self.gate.admit(ids, hashes)
            everything = all(fresh)
            if everything:
                accepted, accepted_ids, keys = items, ids, all_keys
            else:
                accepted = list(compress(items, fresh))
                accepted_ids = list(compress(ids, fresh))
                keys = all_keys
                if self._key_of is not None and len(all_keys) > 1:
                    keys = list(set(map(self._key_of, accepted)))
            ticket = None
            seq = -1
            if accepted:
                seq = self._appended_seq + 1
                meta = _meta_encoder.encode(_Meta(accepted_ids, keys, seq))
                # The rows as a JSON array: the gateway's own bytes of the accepted items
                # when the decoder kept them (no re-encoding), else the items encoded.
                data = decoded.array(None if everything else fresh)
                if data is None:
                    data = _rows_encoder.encode(accepted)
                ticket = self.spool.enqueue(meta, data, len(accepted))
                self._last_ticket = ticket
                self.gate.mark_pending(seq, accepted_ids)
                self._appended_seq = seq
            elif (
                items
                and self._last_ticket is not None
                and (not self._last_ticket.done or self._last_ticket.error is not None)
            ):
                # Duplicates may name keys whose record is still being written: answer
                # only once everything enqueued before is on disk (or fail with it).
                ticket = self._last_ticket
        result = SubmitResult(
            len(accepted), len(items) - len(accepted), decoded.rejected, ticket, seq
        )
        if seq >= 0 and ticket is not None:
            ticket.add_done_callback(partial(self._written, seq))
            if self.admission is not None:
                prepared = self.admission.prepare(accepted)
                if prepared is not None:
                    admitted = _Admitted(self.admission, seq, prepared)
                    ticket.add_done_callback(admitted.on_written)
                    result.admitted = admitted
        metrics.INGEST_ITEMS.labels(self.schema.name, "accepted").inc(len(accepted))
        metrics.INGEST_ITEMS.labels(self.schema.name, "duplicate").inc(len(items) - len(accepted))
        metrics.INGEST_ITEMS.labels(self.schema.name, "rejected").inc(len(decoded.rejected))
        metrics.SPOOL_BYTES.labels(self.schema.name).set(self.spool.pending_bytes)
        self._wake.set()
        return result

    def wait_durable(self, result: SubmitResult) -> None:
        """Block until the batch's record is in the spool (and fsync'd)."""
        if result.ticket is not None:
            self._settled(result, result.ticket.wait)

    async def durable(self, result: SubmitResult) -> None:
        """Await the batch's spool write (group commit) without blocking the loop."""
        ticket = result.ticket
        if ticket is None:
            return
        if not ticket.done:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()

            def wake(_: Ticket) -> None:
                loop.call_soon_threadsafe(_resolve, future)

            ticket.add_done_callback(wake)
            await future
        self._settled(result, ticket.wait)

    def _settled(self, result: SubmitResult, wait: Callable[[], Cursor]) -> None:
        try:
            wait()
        except OSError:
            # Never acknowledged: the keys may be admitted again by a retry (`_written`
            # released them already; releasing twice is harmless).
            self.gate.release(result.seq)
            raise
        if result.admitted is not None:
            result.admitted.settle()

    def _written(self, seq: int, ticket: Ticket) -> None:
        """The spool write of record `seq` ended. If it failed, its keys leave the gate
        and the record counts as settled, so barriers and `stop` do not wait for it."""
        if ticket.error is None:
            return
        self.gate.release(seq)
        with self.gate.lock:
            # Batches of duplicates admitted from now on were judged without these keys:
            # they need not fail with this write.
            if self._last_ticket is ticket:
                self._last_ticket = None
        with self._stored_cond:
            self._lost.add(seq)
            self._advance_stored(self._stored_seq)

    def _advance_stored(self, stored_seq: int) -> None:
        """Everything up to `stored_seq` is stored; skip lost seqs that follow.
        Caller holds `_stored_cond`."""
        while stored_seq + 1 in self._lost:
            stored_seq += 1
        self._lost = {seq for seq in self._lost if seq > stored_seq}
        self._stored_seq = stored_seq
        self._stored_cond.notify_all()

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

    def hold(self) -> int:
        """Let the writer store every record admitted so far, and none after, until
        `release`; returns the last admitted record's seq (-1: none). Admission goes on
        meanwhile (batches are spooled and answered); only storing waits. With
        `wait_stored_through(seq)`, ClickHouse then holds exactly the records up to seq:
        a cut that the budgets' ledger reads its base at."""
        with self.gate.lock:
            self._hold = self._appended_seq
            return self._hold

    def release(self) -> None:
        self._hold = None
        self._wake.set()

    def wait_stored_through(self, seq: int, timeout: float) -> bool:
        with self._stored_cond:
            self._wake.set()
            return self._stored_cond.wait_for(lambda: self._stored_seq >= seq, timeout)

    def _until_hold(self, records: list[Record]) -> list[Record]:
        """The records the writer may store now (all of them unless a hold is set)."""
        hold = self._hold
        if hold is None:
            return records
        allowed = []
        for record in records:
            if _meta_decoder.decode(record.meta).seq > hold:
                break
            allowed.append(record)
        return allowed

    # -- writer -------------------------------------------------------------------------

    def _lookup(self, ids: list[str]) -> set[str]:
        metrics.GATE_LOOKUPS.labels(self.schema.name).inc()
        try:
            return self.store.existing_ids(ids)
        except Exception as exc:
            # Without the answer no key of the batch can be decided: 503, retry later.
            raise Unavailable(f"cannot check for duplicates now: {exc}") from exc

    def _run(self) -> None:
        check = False
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                records = self.spool.read(
                    self._read_pos, max_bytes=WRITER_MAX_BYTES, max_count=WRITER_MAX_ROWS
                )
            except Exception as exc:
                self.last_error = f"spool read: {type(exc).__name__}: {exc}"
                log.error("reading the %s spool failed: %s", self.schema.name, exc)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            records = self._until_hold(records)
            if not records:
                self._wake.wait(WRITER_IDLE_WAIT)
                self._wake.clear()
                continue
            try:
                last_seq = self._store(records, check=check)
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
            self.gate.stored(last_seq)
            with self._stored_cond:
                self._advance_stored(max(last_seq, self._stored_seq))
            metrics.SPOOL_BYTES.labels(self.schema.name).set(self.spool.pending_bytes)

    def _store(self, records: list[Record], *, check: bool) -> int:
        """Store the records exactly once; return the last one's seq."""
        started = time.perf_counter()
        ids: list[str] = []
        keys: set[tuple[str, str]] = set()
        last_seq = -1
        for record in records:
            meta = _meta_decoder.decode(record.meta)
            ids.extend(meta.ids)
            keys.update(meta.keys)
            last_seq = meta.seq
        if check:
            payload = self._canonical_unstored_rows(records)
        else:
            # Each record holds a JSON array; JSONEachRow takes objects separated by
            # commas, so the arrays' insides are joined without decoding them.
            payload = b",".join(_array_body(record.data) for record in records)
        # Tenants and projects are registered (new tenants numbered) before their rows
        # are inserted: ClickHouse stamps each row with its tenant's dense number.
        self._register_keys(keys)
        self.store.insert_rows(payload)
        self.store.insert_ids(ids)
        self.spool.commit(records[-1].end, sum(record.size for record in records))
        metrics.STORED_ROWS.labels(self.schema.name).inc(len(ids))
        metrics.STORE_SECONDS.labels(self.schema.name).observe(time.perf_counter() - started)
        return last_seq

    def _canonical_unstored_rows(self, records: list[Record]) -> bytes:
        """After a crash or a failed insert: the rows ClickHouse does not have yet,
        re-encoded from the validated items (so bytes ClickHouse refused, e.g. a
        duplicate JSON key msgspec tolerated, never block the writer twice)."""
        items: list[Any] = []
        for record in records:
            items.extend(self.schema.list_decoder.decode(record.data))
        present = self.store.existing_in_table(
            list(map(self._id_of, items)), [item.timestamp for item in items]
        )
        if present:
            items = [item for item in items if self._id_of(item) not in present]
        return bytes(_array_body(_rows_encoder.encode(items))) if items else b""

    def _register_keys(self, keys: set[tuple[str, str]]) -> None:
        """Register tenants/projects seen for the first time. Raises if that fails: the
        batch then waits in the spool and the writer retries it, like a failed insert."""
        if self._on_keys is None:
            return
        new = keys - self._known_keys
        if not new:
            return
        self._on_keys(new)
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
