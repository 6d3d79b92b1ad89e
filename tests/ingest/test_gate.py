"""The dedup gate: no false negatives, exact answers, growth, Python/ClickHouse hashes agree."""

from __future__ import annotations

import numpy as np

from metering.clickhouse.migrations import migrate
from metering.ingest import gate as gate_module
from metering.ingest.gate import BloomFilter, DedupGate, key_hashes
from metering.ingest.store import EVENTS_TABLE, IngestStore


def test_bloom_has_no_false_negatives_and_few_false_positives() -> None:
    bloom = BloomFilter(200_000)
    keys = [f"k-{i}" for i in range(200_000)]
    bloom.add(key_hashes(keys))
    assert bloom.contains(key_hashes(keys)).all()
    others = bloom.contains(key_hashes([f"other-{i}" for i in range(200_000)]))
    assert others.mean() < 5e-4


def test_python_and_clickhouse_hash_alike(ch_client) -> None:  # type: ignore[no-untyped-def]
    migrate(ch_client)
    store = IngestStore(ch_client, EVENTS_TABLE)
    ids = ["a", "é-ü", "x" * 128, "retry:42"]
    store.insert_ids(ids)
    from_ch = np.concatenate(list(store.id_hashes()))
    expected = key_hashes(ids)
    assert sorted(map(tuple, from_ch.tolist())) == sorted(map(tuple, expected.tolist()))


def test_gate_is_exact_and_grows(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gate_module, "MIN_CAPACITY", 1000)
    stored: set[str] = set()

    def lookup(ids: list[str]) -> set[str]:
        return stored & set(ids)

    def source():  # type: ignore[no-untyped-def]
        yield key_hashes(sorted(stored))

    gate = DedupGate(lookup, source)
    for seq, start in enumerate(range(0, 5000, 500)):
        keys = [f"e{i}" for i in range(start, start + 500)] + [f"e{start}"]
        with gate.lock:
            fresh = gate.admit(keys)
            assert fresh == [True] * 500 + [False]
            gate.mark_pending(seq, keys[:500])
        stored.update(keys[:500])
        gate.stored(seq)
    assert gate.bloom.capacity >= 5000
    gate._recent.clear()
    gate._recent_old.clear()
    with gate.lock:
        assert gate.admit(["e1", "e4999", "new"]) == [False, False, True]
