"""Spill files: where records go when memory is full or a close gives up, so none is lost.

Each file is NDJSON, one record a line, fsync'd before a write returns, and named
``<kind>-<ns>-<seq>.ndjson`` so that names sort in arrival order: a client started on the
same directory after a crash replays them oldest first. A failed write is truncated back,
never leaving a torn line behind. One directory belongs to one live client (an ``flock`` on
``.lock``), because two clients replaying the same files would each send them.

This module does the file I/O only; which records spill, and when files are replayed and
deleted, is decided by the core (``metering.client.core``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from metering.client.records import KEY_FIELD, Item, Kind, logger

_SPILL_NAME: Final = re.compile(r"^(events|probes)-(\d{20})-(\d{10})\.ndjson$")


@dataclass(slots=True)
class SpillFile:
    path: Path
    count: int  # records in the file (non-empty lines)


@dataclass(slots=True)
class SpillWriter:
    path: Path
    fd: int
    count: int = 0
    nbytes: int = 0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpillDir:
    """One client's spill directory, locked for as long as the client lives."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"spill_dir {path} is in use by another metering client") from None
        self.path = path
        self._lock_fd: int | None = fd
        self._seq = 0
        self._last_ns = time.time_ns()
        # Files written by abandon() sort before this run's spill files and after the
        # leftovers of earlier runs.
        self._start_ns = self._last_ns

    def leftovers(self) -> list[tuple[Kind, SpillFile]]:
        """Files a previous run left, oldest first; this run's names sort after them."""
        found: list[tuple[Kind, SpillFile]] = []
        for entry in sorted(self.path.iterdir(), key=lambda p: p.name):
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
            found.append((kind, SpillFile(entry, count)))
        self._start_ns = self._last_ns
        return found

    def new_writer(self, kind: Kind) -> SpillWriter:
        self._seq += 1
        self._last_ns = max(self._last_ns, time.time_ns())
        path = self.path / f"{kind}-{self._last_ns:020d}-{self._seq:010d}.ndjson"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fsync_dir(self.path)
        return SpillWriter(path, fd)

    @staticmethod
    def close_writer(w: SpillWriter) -> SpillFile | None:
        """Close the file; an empty one is removed (None)."""
        os.close(w.fd)
        if w.count:
            return SpillFile(w.path, w.count)
        w.path.unlink(missing_ok=True)
        return None

    @staticmethod
    def append(w: SpillWriter, lines: list[bytes]) -> None:
        """Write and fsync whole lines; on failure, truncate back to the last whole line."""
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

    @staticmethod
    def read(kind: Kind, sf: SpillFile) -> tuple[list[Item], list[bytes]]:
        """(records with a usable id, unreadable lines); OSError if the file cannot be read."""
        raw = sf.path.read_bytes()
        key_field = KEY_FIELD[kind]
        good: list[Item] = []
        corrupt: list[bytes] = []
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
                good.append(Item(key, line))
            else:
                corrupt.append(line)
        return good, corrupt

    def write_abandoned(self, kind: Kind, items: Sequence[Item], after: Path | None) -> Path:
        """Persist records a close could not deliver, in arrival order.

        They are newer than the file being sent (``after``, appended to) and older than this
        run's other spill files, so without ``after`` they get a name that sorts first.
        """
        path = after or self.path / f"{kind}-{self._start_ns:020d}-{0:010d}.ndjson"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            w = SpillWriter(path, fd, nbytes=os.fstat(fd).st_size)
            self.append(w, [i.data + b"\n" for i in items])
        finally:
            os.close(fd)
        fsync_dir(self.path)
        return path

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
