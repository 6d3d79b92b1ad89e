"""The spool: append/read/commit, segment rotation, torn tails, the size limit."""

from __future__ import annotations

import os
import threading
from pathlib import Path

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
        thread.join()
    ends = [ticket.wait(10) for ticket in tickets]
    assert len(set(ends)) == 800
    records = spool.read(spool.checkpoint, max_bytes=1 << 30, max_count=10_000)
    assert sorted(r.data for r in records) == sorted(
        b"%d-%d\n" % (n, i) for n in range(4) for i in range(200)
    )
    for n in range(4):  # each thread's records keep their order
        mine = [r.data for r in records if r.data.startswith(b"%d-" % n)]
        assert mine == [b"%d-%d\n" % (n, i) for i in range(200)]


def test_failed_write_fails_the_tickets_and_hides_the_records(
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
    monkeypatch.undo()
    later = spool.enqueue(b"", b"after\n", 1)
    with pytest.raises(OSError, match="No space"):
        later.wait(10)  # broken until restart
    records = spool.read(spool.checkpoint, max_bytes=1 << 20, max_count=10)
    assert [r.data for r in records] == [b"kept\n"]
