"""The spool: append/read/commit, segment rotation, torn tails, the size limit."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from metering.ingest import spool as spool_module
from metering.ingest.spool import Cursor, Spool, SpoolFull


def make(tmp_path: Path, max_bytes: int = 1 << 30) -> Spool:
    return Spool(tmp_path / "spool", max_bytes=max_bytes, fsync=True)


def test_records_come_back_in_order_and_commit_frees_them(tmp_path: Path) -> None:
    spool = make(tmp_path)
    ends = [spool.append(b"m%d" % i, b"row %d\n" % i, 1) for i in range(10)]
    assert ends == sorted(ends) and len(set(ends)) == 10
    records = spool.read(spool.checkpoint, max_bytes=1 << 20, max_count=4)
    assert [r.data for r in records] == [b"row %d\n" % i for i in range(4)]
    spool.commit(records[-1].end, sum(r.size for r in records))
    rest = spool.read(spool.checkpoint, max_bytes=1 << 20, max_count=100)
    assert [r.meta for r in rest] == [b"m%d" % i for i in range(4, 10)]
    spool.commit(rest[-1].end, sum(r.size for r in rest))
    assert spool.pending_bytes == 0
    spool.close()
    reopened = make(tmp_path)
    assert reopened.read(reopened.checkpoint, max_bytes=1 << 20, max_count=100) == []


def test_uncommitted_records_survive_reopen(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append(b"a", b"1\n", 1)
    spool.append(b"b", b"2\n", 1)
    spool.close()
    reopened = make(tmp_path)
    records = reopened.read(reopened.checkpoint, max_bytes=1 << 20, max_count=100)
    assert [r.data for r in records] == [b"1\n", b"2\n"]
    assert reopened.pending_bytes == sum(r.size for r in records)


def test_torn_tail_is_cut_off(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append(b"a", b"whole\n", 1)
    end = spool.append(b"b", b"torn record\n", 1)
    spool.close()
    segment = tmp_path / "spool" / "seg-000000000000.wal"
    with open(segment, "r+b") as handle:
        handle.truncate(end.offset - 3)
    reopened = make(tmp_path)
    records = reopened.read(reopened.checkpoint, max_bytes=1 << 20, max_count=100)
    assert [r.data for r in records] == [b"whole\n"]
    reopened.append(b"c", b"after\n", 1)
    records = reopened.read(reopened.checkpoint, max_bytes=1 << 20, max_count=100)
    assert [r.data for r in records] == [b"whole\n", b"after\n"]


def test_segments_rotate_and_are_deleted_after_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 200)
    spool = make(tmp_path)
    for i in range(20):
        spool.append(b"", b"x" * 50 + b"%d\n" % i, 1)
    segments = sorted((tmp_path / "spool").glob("seg-*.wal"))
    assert len(segments) > 3
    records = spool.read(spool.checkpoint, max_bytes=1 << 20, max_count=100)
    assert len(records) == 20
    spool.commit(records[-1].end, sum(r.size for r in records))
    assert len(list((tmp_path / "spool").glob("seg-*.wal"))) == 1
    assert spool.pending_bytes == 0
    spool.append(b"", b"next\n", 1)
    assert [r.data for r in spool.read(spool.checkpoint, max_bytes=1 << 20, max_count=9)] == [
        b"next\n"
    ]


def test_full_spool_refuses_and_recovers_after_commit(tmp_path: Path) -> None:
    spool = make(tmp_path, max_bytes=1024 * 1024)
    payload = b"y" * 300_000
    spool.append(b"", payload, 1)
    spool.append(b"", payload, 1)
    spool.append(b"", payload, 1)
    with pytest.raises(SpoolFull, match="limit 1048576"):
        spool.append(b"", payload, 1)
    records = spool.read(spool.checkpoint, max_bytes=1, max_count=1)
    spool.commit(records[0].end, records[0].size)
    spool.append(b"", payload, 1)


def test_corrupt_record_in_the_middle_is_reported(tmp_path: Path) -> None:
    spool = make(tmp_path)
    first_end = spool.append(b"", b"one\n", 1)
    spool.append(b"", b"two\n", 1)
    segment = tmp_path / "spool" / "seg-000000000000.wal"
    fd = os.open(segment, os.O_RDWR)
    os.pwrite(fd, b"X", first_end.offset + 20)
    os.close(fd)
    with pytest.raises(RuntimeError, match="corrupt"):
        spool.read(Cursor(0, first_end.offset), max_bytes=1 << 20, max_count=10)


def test_group_commit_from_many_threads_keeps_every_record(tmp_path: Path) -> None:
    spool = make(tmp_path)
    tickets = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(200):
            ticket = spool.enqueue(b"", b"%d-%d\n" % (n, i), 1)
            with lock:
                tickets.append(ticket)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    ends = [ticket.wait(10) for ticket in tickets]
    assert len(set(ends)) == 800
    records = spool.read(spool.checkpoint, max_bytes=1 << 30, max_count=10_000)
    assert sorted(r.data for r in records) == sorted(
        b"%d-%d\n" % (n, i) for n in range(4) for i in range(200)
    )
    for n in range(4):  # each thread's records keep their order
        mine = [r.data for r in records if r.data.startswith(b"%d-" % n)]
        assert mine == [b"%d-%d\n" % (n, i) for i in range(200)]


def test_failed_write_fails_the_tickets_hides_the_records_and_later_writes_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make(tmp_path)
    spool.append(b"", b"kept\n", 1)

    def disk_full(fd: int, buffers: list[bytes]) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", disk_full)
    ticket = spool.enqueue(b"", b"lost\n", 1)
    with pytest.raises(OSError, match="No space"):
        ticket.wait(10)
    assert spool.write_error is not None and spool.write_error.errno == 28
    monkeypatch.undo()
    spool.append(b"", b"after\n", 1)  # no restart needed
    assert spool.write_error is None
    records = spool.read(spool.checkpoint, max_bytes=1 << 20, max_count=10)
    assert [r.data for r in records] == [b"kept\n", b"after\n"]
    assert spool.pending_bytes == sum(r.size for r in records)


def _half_written_then_full(real: Any) -> Any:
    """os.writev that writes half of what it is given, then fails as a full disk."""

    def writev(fd: int, buffers: list[bytes]) -> int:
        data = b"".join(buffers)
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    return writev


def test_a_write_that_fails_mid_frame_leaves_no_torn_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make(tmp_path)
    kept_end = spool.append(b"m", b"kept\n", 1)
    monkeypatch.setattr(os, "writev", _half_written_then_full(os.writev))
    with pytest.raises(OSError, match="No space"):
        spool.append(b"m", b"half of this record reaches the file\n", 1)
    monkeypatch.undo()
    segment = tmp_path / "spool" / "seg-000000000000.wal"
    assert segment.stat().st_size == kept_end.offset  # cut back to the last whole record
    spool.append(b"m", b"after\n", 1)
    assert [r.data for r in spool.read(spool.checkpoint, max_bytes=1 << 20, max_count=9)] == [
        b"kept\n",
        b"after\n",
    ]
    spool.close()
    reopened = make(tmp_path)
    assert [r.data for r in reopened.read(reopened.checkpoint, max_bytes=1 << 20, max_count=9)] == [
        b"kept\n",
        b"after\n",
    ]


def test_a_failed_fsync_fails_the_batch_and_cuts_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make(tmp_path)
    spool.append(b"", b"kept\n", 1)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        spool.append(b"", b"not durable\n", 1)
    monkeypatch.setattr(os, "fsync", real_fsync)
    spool.append(b"", b"after\n", 1)
    assert [r.data for r in spool.read(spool.checkpoint, max_bytes=1 << 20, max_count=9)] == [
        b"kept\n",
        b"after\n",
    ]


def test_a_failure_after_a_rotation_keeps_the_records_already_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One group commit spans two segments: the part fsync'd before the rotation is
    acknowledged, the part that failed in the new segment is not."""
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 200)
    spool = make(tmp_path)
    real_writev, real_fsync = os.writev, os.fsync
    calls = {"writev": 0}
    release, waiting = threading.Event(), threading.Event()

    def third_writev_fails(fd: int, buffers: list[bytes]) -> int:
        calls["writev"] += 1
        if calls["writev"] == 3:
            raise OSError(28, "No space left on device")
        return real_writev(fd, buffers)

    def first_fsync_waits(fd: int) -> None:
        waiting.set()
        assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "writev", third_writev_fails)
    monkeypatch.setattr(os, "fsync", first_fsync_waits)
    head = spool.enqueue(b"", b"x" * 100, 1)
    assert waiting.wait(10)  # the appender waits in its fsync
    first = spool.enqueue(b"", b"y" * 50, 1)  # these two go out in one round:
    second = spool.enqueue(b"", b"z" * 100, 1)  # y fills segment 0, z opens segment 1
    release.set()
    assert head.wait(10).segment == 0
    assert first.wait(10).segment == 0
    with pytest.raises(OSError, match="No space"):
        second.wait(10)
    monkeypatch.undo()
    spool.append(b"", b"after", 1)
    records = spool.read(spool.checkpoint, max_bytes=1 << 20, max_count=9)
    assert [r.data for r in records] == [b"x" * 100, b"y" * 50, b"after"]


def test_the_disk_error_clears_once_space_is_back_without_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "RETRY_INTERVAL", 0.02)
    spool = make(tmp_path)
    spool.append(b"", b"kept\n", 1)
    real_fallocate = os.posix_fallocate
    full = {"flag": True}

    def disk_full(fd: int, buffers: list[bytes]) -> int:
        raise OSError(28, "No space left on device")

    def fallocate(fd: int, offset: int, length: int) -> None:
        if full["flag"]:
            raise OSError(28, "No space left on device")
        real_fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(os, "writev", disk_full)
    with pytest.raises(OSError):
        spool.append(b"", b"lost\n", 1)
    full["flag"] = False  # space is back; nothing is sent meanwhile
    deadline = time.monotonic() + 10
    while spool.write_error is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spool.write_error is None
    monkeypatch.undo()
    spool.close()
    reopened = make(tmp_path)  # the probe left no bytes behind
    records = reopened.read(reopened.checkpoint, max_bytes=1 << 20, max_count=9)
    assert [r.data for r in records] == [b"kept\n"]
    assert reopened.pending_bytes == records[0].size
