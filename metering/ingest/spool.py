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
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_HEADER = struct.Struct("<HIIII")
_MAGIC = 0x5A17
SEGMENT_BYTES = 64 * 1024 * 1024


class SpoolFull(RuntimeError):
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
        self._sync_lock = threading.Lock()
        self._checkpoint_path = self.dir / "checkpoint"
        self.checkpoint = self._read_checkpoint()
        self._segments = self._list_segments()
        if not self._segments:
            self._segments = [self.checkpoint.segment]
        self._recover_tail()
        last = self._segments[-1]
        self._fd = os.open(self._path(last), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._write_pos = Cursor(last, os.fstat(self._fd).st_size)
        self._synced_pos = self._write_pos
        # Sequence numbers are per process: records already in the log at start get
        # numbers as the reader meets them; new records continue from there.
        self._next_seq = 0
        self._pending_bytes = self._bytes_after(self.checkpoint)

    # -- paths and recovery -------------------------------------------------------------

    def _path(self, segment: int) -> Path:
        return self.dir / _segment_name(segment)

    def _list_segments(self) -> list[int]:
        numbers = sorted(int(p.name[4:16]) for p in self.dir.glob("seg-*.wal"))
        return [n for n in numbers if n >= self.checkpoint.segment]

    def _read_checkpoint(self) -> Cursor:
        try:
            segment, offset = self._checkpoint_path.read_text().split()
            return Cursor(int(segment), int(offset))
        except FileNotFoundError:
            return Cursor(0, 0)

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

    def append(self, meta: bytes, data: bytes, count: int) -> tuple[int, Cursor]:
        """Append one record; return (seq, end position). Raises SpoolFull."""
        crc = zlib.crc32(data, zlib.crc32(meta))
        header = _HEADER.pack(_MAGIC, len(meta), len(data), count, crc)
        size = len(header) + len(meta) + len(data)
        with self._lock:
            if self._pending_bytes + size > self.max_bytes:
                raise SpoolFull(
                    f"ingest spool holds {self._pending_bytes} bytes not yet stored in "
                    f"ClickHouse (limit {self.max_bytes})"
                )
            if self._write_pos.offset + size > SEGMENT_BYTES and self._write_pos.offset > 0:
                self._rotate()
            written = os.write(self._fd, header + meta + data)
            if written != size:  # pragma: no cover - a full disk
                raise OSError(f"short write to spool ({written} of {size} bytes)")
            self._write_pos = Cursor(self._write_pos.segment, self._write_pos.offset + size)
            self._pending_bytes += size
            seq = self._next_seq
            self._next_seq += 1
            return seq, self._write_pos

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        number = self._write_pos.segment + 1
        self._fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments.append(number)
        self._write_pos = Cursor(number, 0)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def is_synced(self, upto: Cursor) -> bool:
        return upto <= self._synced_pos

    def sync(self, upto: Cursor) -> None:
        """Make every record up to `upto` durable (group commit; blocking)."""
        if not self.fsync or upto <= self._synced_pos:
            return
        with self._sync_lock:
            if upto <= self._synced_pos:
                return
            with self._lock:
                target = self._write_pos
                fd = self._fd
            os.fsync(fd)
            self._synced_pos = max(self._synced_pos, target)

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
        with self._lock:
            if self.fsync:
                os.fsync(self._fd)
            os.close(self._fd)


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
