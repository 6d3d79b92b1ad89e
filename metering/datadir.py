"""The data directory: its exclusive lock and the generated admin token.

chDB allows one process per data path, so one `metering serve` owns a data dir. We take
an advisory `flock` on `<data dir>/.lock` before opening any store so that a second
process fails at once with one clear line instead of a chDB traceback.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sys
from pathlib import Path
from typing import IO


class DataDirBusy(RuntimeError):
    """Another process holds the data dir."""


class DataDirLock:
    """An exclusive, process-lifetime lock on a data dir (released on exit or crash)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / ".lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise DataDirBusy(
                f"data dir {self.path.parent} is in use by {holder}; "
                "stop it or set METERING_DATA_DIR to another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def lock_or_explain(data_dir: Path) -> DataDirLock | None:
    """Take the data dir's lock for a command; if another process holds it, print the
    one-line reason to stderr and return None (the command then exits 1)."""
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except DataDirBusy as exc:
        print(f"metering: {exc}", file=sys.stderr)
        return None
    return lock


def ensure_admin_token(data_dir: Path, configured: str | None) -> tuple[str, bool]:
    """Return (token, created). A configured token wins; otherwise one is generated on
    first start and stored with mode 0600 in the data dir."""
    if configured:
        return configured, False
    path = data_dir / "admin_token"
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    token = "mt_admin_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token, True
