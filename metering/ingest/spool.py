"""The ingest spool: a local write-ahead log between a 202 and ClickHouse.

Every accepted batch is appended here before the API answers 202, so accepted events
survive `kill -9` (the bytes are in the kernel's page cache once `write` returns) and,
with `fsync="always"`, power loss too (group commit: one fsync covers every batch
written before it). The writer thread drains records into ClickHouse in order of arrival
and then moves the checkpoint; segments wholly before the checkpoint are deleted.
While ClickHouse is down or slow the spool simply grows, up to `max_bytes`; past that
`append` raises `SpoolFull` and the API answers 503 with Retry-After.

Record layout (little endian):
    magic u16 | meta_len u32 | data_len u32 | count u32 | crc32 u32 | meta | data
`meta` is msgpack (ids, and for events the distinct (tenant, project) pairs), `data` is
the rows as one JSON array, ready for `INSERT ... FORMAT JSONEachRow`. A torn record at the tail
(a crash mid-write) fails its CRC and is cut off at recovery; it was never answered 202.

A write or fsync that fails (a full disk) fails only the records of that round: the file is
cut back to the last whole record, nothing of the round is acknowledged or readable, and the
next round simply tries again. `write_error` says what failed until a write succeeds or,
with no traffic, until a probe finds room for the failed round again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_HEADER = struct.Struct("<HIIII")
_MAGIC = 0x5A17
SEGMENT_BYTES = 64 * 1024 * 1024
_IOV_MAX = 1020  # buffers per writev (Linux allows 1024)
RETRY_INTERVAL = 1.0  # seconds between probes of the disk after a failed write
_Pending = tuple[bytes, bytes, int]  # a record handed in, not yet written: meta, data, count


class Unavailable(RuntimeError):
    """Items can be neither stored nor spooled right now (the API answers 503)."""


class SpoolFull(Unavailable):
    """The spool holds `max_bytes` of unapplied records."""


@dataclass(frozen=True, order=True, slots=True)
class Cursor:
    segment: int
    offset: int


@dataclass(slots=True)
class Record:
    seq: int
    end: Cursor  # position just after this record
    meta: bytes
    data: bytes
    count: int
    size: int


def _segment_name(number: int) -> str:
    return f"seg-{number:012d}.wal"


class Spool:
    """Append-only segmented log with a checkpoint. Thread-safe."""

    def __init__(self, directory: Path, *, max_bytes: int, fsync: bool) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._checkpoint_path = self.dir / "checkpoint"
        self.checkpoint = self._read_checkpoint()
        self._segments = self._list_segments()
        if not self._segments:
            self._segments = [self.checkpoint.segment]
        self._recover_tail()
        self._clamp_checkpoint()
        last = self._segments[-1]
        self._fd = os.open(self._path(last), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._write_pos = Cursor(last, os.fstat(self._fd).st_size)
        self._pending_bytes = self._bytes_after(self.checkpoint)
        # Records handed in and not yet written, in order; the appender thread writes
        # them with one writev and one fsync per round (group commit), so a request
        # thread never blocks on the file (ext4 makes write() wait for a running fsync).
        self._queue: list[tuple[_Pending, int, Ticket]] = []
        self._wake = threading.Condition(self._lock)
        self._closing = False
        # The last write round's failure, until a round succeeds (for /readyz).
        self.write_error: OSError | None = None
        self._needs_cut = False  # a failed round may have left bytes after _write_pos
        self._failed_bytes = 0  # size of the failed round: what the probe must fit
        self._appender = threading.Thread(
            target=self._append_loop, name=f"spool-{directory.name}", daemon=True
        )
        self._appender.start()

    # -- paths and recovery -------------------------------------------------------------

    def _path(self, segment: int) -> Path:
        return self.dir / _segment_name(segment)

    def _list_segments(self) -> list[int]:
        numbers = sorted(int(p.name[4:16]) for p in self.dir.glob("seg-*.wal"))
        return [n for n in numbers if n >= self.checkpoint.segment]

    def _read_checkpoint(self) -> Cursor:
        """The stored checkpoint; if it is missing or unreadable (power loss), the start
        of the oldest segment: replaying too much is safe, the writer skips stored rows."""
        try:
            segment, offset = self._checkpoint_path.read_text().split()
            return Cursor(int(segment), int(offset))
        except FileNotFoundError:
            return Cursor(0, 0)
        except ValueError:
            numbers = sorted(int(p.name[4:16]) for p in self.dir.glob("seg-*.wal"))
            return Cursor(numbers[0] if numbers else 0, 0)

    def _recover_tail(self) -> None:
        """Cut a torn record off the end of the last segment."""
        last = self._path(self._segments[-1])
        if not last.exists():
            return
        with open(last, "rb") as handle:
            data = handle.read()
        good = 0
        for _meta, _data, _count, end in _iter_records(data, 0):
            good = end
        if good != len(data):
            with open(last, "r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())

    def _clamp_checkpoint(self) -> None:
        """A checkpoint past the end of its segment (its file lost a tail in a power
        loss that the checkpoint survived) is pulled back to that end."""
        path = self._path(self.checkpoint.segment)
        size = path.stat().st_size if path.exists() else 0
        if self.checkpoint.offset > size:
            self.checkpoint = Cursor(self.checkpoint.segment, size)

    def _bytes_after(self, cursor: Cursor) -> int:
        total = 0
        for segment in self._segments:
            size = self._path(segment).stat().st_size if self._path(segment).exists() else 0
            if segment == cursor.segment:
                total += max(0, size - cursor.offset)
            elif segment > cursor.segment:
                total += size
        return total

    # -- writing --------------------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def enqueue(self, meta: bytes, data: bytes, count: int) -> Ticket:
        """Hand one record to the appender; the ticket completes once it is written
        (and fsync'd with fsync=True). Raises SpoolFull at once past max_bytes. The
        appender computes the record's CRC: the caller may hold a lock (the gate's) that
        a request on the event loop waits for, and a 10 MB CRC takes ~4 ms."""
        size = _HEADER.size + len(meta) + len(data)
        ticket = Ticket()
        with self._lock:
            if self._closing:
                raise SpoolFull("the spool is closing")
            if self._pending_bytes + size > self.max_bytes:
                raise SpoolFull(
                    f"ingest spool holds {self._pending_bytes} bytes not yet stored in "
                    f"ClickHouse (limit {self.max_bytes})"
                )
            self._pending_bytes += size
            self._queue.append(((meta, data, count), size, ticket))
            self._wake.notify()
        return ticket

    def append(self, meta: bytes, data: bytes, count: int) -> Cursor:
        """Append one record and wait until it is durable; return its end position."""
        return self.enqueue(meta, data, count).wait()

    def _append_loop(self) -> None:
        while True:
            with self._lock:
                if not self._queue and not self._closing:
                    self._wake.wait(RETRY_INTERVAL if self.write_error is not None else None)
                batch, self._queue = self._queue, []
                if not batch and self._closing:
                    return
            if batch:
                self._write_round(batch)
            elif self.write_error is not None:
                self._probe()

    def _write_round(self, batch: list[tuple[_Pending, int, Ticket]]) -> None:
        try:
            self._cut()
            end = self._write(batch)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._fail_round(batch, exc)
            return
        with self._lock:
            # Readers see the records once durable (a segment rotation mid-batch
            # publishes the records before it early; they are fsync'd by then).
            self._write_pos = end
        self.write_error = None
        for _, _, ticket in batch:
            ticket.complete()

    def _fail_round(self, batch: list[tuple[_Pending, int, Ticket]], exc: OSError) -> None:
        """Fail what this round did not make durable; keep the spool appendable."""
        self.write_error = exc
        self._needs_cut = True
        durable = self._write_pos  # records before a rotation were fsync'd by it
        failed = [
            (size, ticket)
            for _, size, ticket in batch
            if ticket.end is None or ticket.end > durable
        ]
        self._failed_bytes = sum(size for size, _ in failed)
        with contextlib.suppress(OSError):  # else retried before the next write
            self._cut()
        with self._lock:
            self._pending_bytes -= self._failed_bytes
        failed_tickets = {id(ticket) for _, ticket in failed}
        for _, _, ticket in batch:
            if id(ticket) in failed_tickets:
                ticket.end = None
                ticket.fail(exc)
            else:
                ticket.complete()

    def _cut(self) -> None:
        """Cut what a failed round left after the last durable record (a torn frame, or
        whole records whose fsync failed) so the next round appends after good data."""
        if not self._needs_cut:
            return
        os.ftruncate(self._fd, self._write_pos.offset)
        os.fsync(self._fd)
        self._needs_cut = False

    def _probe(self) -> None:
        """With no traffic after a failed write: is there room for that round now?
        (Reserve the space, then give it back; a crash in between leaves zeros that
        recovery cuts off like a torn record.)"""
        try:
            self._cut()
            os.posix_fallocate(self._fd, self._write_pos.offset, max(self._failed_bytes, 4096))
            os.ftruncate(self._fd, self._write_pos.offset)
        except OSError as exc:
            self.write_error = exc
            self._needs_cut = True
            return
        self.write_error = None

    def _write(self, batch: list[tuple[_Pending, int, Ticket]]) -> Cursor:
        """Write the batch in order, rotating segments as they fill; return the end."""
        pos = self._write_pos
        buffers: list[bytes] = []
        group: list[tuple[int, Ticket]] = []
        pending = 0
        for (meta, data, count), size, ticket in batch:
            if pos.offset + pending + size > SEGMENT_BYTES and (pos.offset or pending):
                self._flush(pos, buffers, group)
                buffers, group, pending = [], [], 0
                pos = self._rotate()
            crc = zlib.crc32(data, zlib.crc32(meta))
            buffers.extend((_HEADER.pack(_MAGIC, len(meta), len(data), count, crc), meta, data))
            group.append((size, ticket))
            pending += size
        return self._flush(pos, buffers, group)

    def _flush(self, pos: Cursor, buffers: list[bytes], group: list[tuple[int, Ticket]]) -> Cursor:
        if not buffers:
            return pos
        for start in range(0, len(buffers), _IOV_MAX):
            chunk = buffers[start : start + _IOV_MAX]
            total = sum(len(b) for b in chunk)
            written = os.writev(self._fd, chunk)
            if written != total:  # the disk filled up during this write
                raise OSError(
                    errno.ENOSPC,
                    f"No space left on device (short write to spool: {written} of {total} bytes)",
                )
        offset = pos.offset
        for size, ticket in group:
            offset += size
            ticket.end = Cursor(pos.segment, offset)
        return Cursor(pos.segment, offset)

    def _rotate(self) -> Cursor:
        """Start the next segment. Until the last step nothing changes, so a failure
        leaves the spool writing to the old segment (which the caller then cuts back)."""
        os.fsync(self._fd)
        number = self._write_pos.segment + 1
        fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.ftruncate(fd, 0)  # a file left by an earlier failed rotation
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd = fd
        with self._lock:
            self._segments.append(number)
            self._write_pos = Cursor(number, 0)
        return Cursor(number, 0)

    # -- reading and checkpointing -----------------------------------------------------

    def read(self, start: Cursor, *, max_bytes: int, max_count: int) -> list[Record]:
        """Whole records from `start` on, until about max_bytes or max_count rows."""
        with self._lock:
            end = self._write_pos
        records: list[Record] = []
        taken_bytes = taken_count = 0
        pos = start
        handle = None
        handle_segment = -1
        try:
            while pos < end and taken_bytes < max_bytes and taken_count < max_count:
                if pos.segment != end.segment:
                    size = self._path(pos.segment).stat().st_size
                    if pos.offset >= size:
                        pos = Cursor(pos.segment + 1, 0)
                        continue
                if handle is None or handle_segment != pos.segment:
                    if handle is not None:
                        handle.close()
                    handle = open(self._path(pos.segment), "rb")  # noqa: SIM115
                    handle_segment = pos.segment
                handle.seek(pos.offset)
                header = handle.read(_HEADER.size)
                magic, meta_len, data_len, count, crc = _HEADER.unpack(header)
                body = handle.read(meta_len + data_len)
                meta, data = body[:meta_len], body[meta_len:]
                if magic != _MAGIC or zlib.crc32(data, zlib.crc32(meta)) != crc:
                    raise RuntimeError(
                        f"spool segment {_segment_name(pos.segment)} is corrupt at {pos.offset}"
                    )
                size = _HEADER.size + meta_len + data_len
                pos = Cursor(pos.segment, pos.offset + size)
                records.append(Record(-1, pos, meta, data, count, size))
                taken_bytes += size
                taken_count += count
        finally:
            if handle is not None:
                handle.close()
        return records

    def commit(self, cursor: Cursor, freed_bytes: int) -> None:
        """Everything before `cursor` is stored in ClickHouse: move the checkpoint."""
        # Not fsync'd on purpose: a checkpoint that a power loss leaves stale, empty or
        # past the end only makes the next start replay more (the writer skips rows
        # ClickHouse already has), never less.
        tmp = self._checkpoint_path.with_suffix(".tmp")
        tmp.write_text(f"{cursor.segment} {cursor.offset}\n")
        os.replace(tmp, self._checkpoint_path)
        with self._lock:
            self.checkpoint = cursor
            self._pending_bytes = max(0, self._pending_bytes - freed_bytes)
            obsolete = [s for s in self._segments if s < cursor.segment]
            self._segments = [s for s in self._segments if s >= cursor.segment]
        for segment in obsolete:
            self._path(segment).unlink(missing_ok=True)

    def close(self) -> None:
        """Write what is queued, then stop the appender and close the file (once)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify()
        self._appender.join()
        os.close(self._fd)


class Ticket:
    """Completion of one enqueued record: `end` once written (and fsync'd)."""

    __slots__ = ("_callbacks", "_event", "_lock", "end", "error")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Ticket], None]] = []
        self.end: Cursor | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def complete(self) -> None:
        self._finish()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[Ticket], None]) -> None:
        """Run `callback(ticket)` when done (at once if it already is). It may run on
        the appender thread, so it must only hand the result over."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def wait(self, timeout: float | None = None) -> Cursor:
        if not self._event.wait(timeout):
            raise TimeoutError("spool write did not complete in time")
        if self.error is not None:
            raise self.error
        assert self.end is not None
        return self.end


def _iter_records(buf: bytes, pos: int) -> Iterator[tuple[bytes, bytes, int, int]]:
    """Yield (meta, data, count, end) for each whole, valid record in buf from pos."""
    size = _HEADER.size
    n = len(buf)
    while pos + size <= n:
        magic, meta_len, data_len, count, crc = _HEADER.unpack_from(buf, pos)
        end = pos + size + meta_len + data_len
        if magic != _MAGIC or end > n:
            return
        meta = buf[pos + size : pos + size + meta_len]
        data = buf[pos + size + meta_len : end]
        if zlib.crc32(data, zlib.crc32(meta)) != crc:
            return
        yield meta, data, count, end
        pos = end
