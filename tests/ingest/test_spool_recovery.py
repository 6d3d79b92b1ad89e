"""Spool checkpoints damaged by power loss: replaying too much is safe (the writer's
check skips stored rows), replaying too little would lose events."""

from __future__ import annotations

from pathlib import Path

from metering.ingest.spool import Spool


def test_unreadable_checkpoint_replays_from_the_oldest_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30, fsync=True)
    first = spool.append(b"", b"[1]", 1)
    spool.append(b"", b"[2]", 1)
    spool.commit(first, 0)
    spool.close()
    (tmp_path / "checkpoint").write_text("")  # a power loss left it empty
    again = Spool(tmp_path, max_bytes=1 << 30, fsync=True)
    records = again.read(again.checkpoint, max_bytes=1 << 20, max_count=10)
    assert [r.data for r in records] == [b"[1]", b"[2]"]  # too much is safe, too little not
    again.close()


def test_checkpoint_past_the_end_is_clamped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30, fsync=False)
    end = spool.append(b"", b"[1]", 1)
    spool.close()
    (tmp_path / "checkpoint").write_text(f"{end.segment} {end.offset + 500}\n")
    again = Spool(tmp_path, max_bytes=1 << 30, fsync=False)
    assert again.checkpoint == end
    again.append(b"", b"[2]", 1)
    assert [r.data for r in again.read(again.checkpoint, max_bytes=1 << 20, max_count=9)] == [
        b"[2]"
    ]
    again.close()
