"""The dedup gate: no false negatives, exact answers, growth, Python/ClickHouse hashes
agree, and a lookup that cannot be made is a 503 (never a guess)."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from fastapi.testclient import TestClient

from metering.app import create_app, wait_ready
from metering.clickhouse.migrations import migrate
from metering.ingest import gate as gate_module
from metering.ingest.gate import BloomFilter, DedupGate, key_hashes
from metering.ingest.store import EVENTS_TABLE, IngestStore
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event


def test_bloom_has_no_false_negatives_and_few_false_positives() -> None:
    bloom = BloomFilter(200_000)
    keys = [f"k-{i}" for i in range(200_000)]
    bloom.add(key_hashes(keys))
    assert bloom.contains(key_hashes(keys)).all()
    others = bloom.contains(key_hashes([f"other-{i}" for i in range(200_000)]))
    assert others.mean() < 5e-4


def test_a_growing_bloom_keeps_no_false_negatives_and_its_rate() -> None:
    bloom = gate_module.GrowingBloom(20_000)
    keys = [f"k-{i}" for i in range(300_000)]
    for at in range(0, len(keys), 1_000):  # as batches arrive: layers of 20K, 40K, ... 320K
        bloom.add(key_hashes(keys[at : at + 1_000]))
    assert [layer.capacity for layer in bloom.layers] == [20_000, 40_000, 80_000, 160_000]
    assert bloom.count == 300_000 and bloom.capacity >= bloom.count
    assert bloom.contains(key_hashes(keys)).all()
    others = bloom.contains(key_hashes([f"other-{i}" for i in range(300_000)]))
    # Each layer at half the rate of the one before: all of them under 2e-4 together.
    assert others.mean() < 2 * gate_module.FALSE_POSITIVE_RATE * 1.5


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

    reads = []

    def source():  # type: ignore[no-untyped-def]
        reads.append(len(stored))
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
    # It grew without reading every stored key again (on the event loop, under the lock:
    # that stalled every request for seconds each time the keys doubled).
    assert reads == [] and len(gate.bloom.layers) > 1
    with gate.lock:
        assert gate.admit(["e1", "e4999", "new"]) == [False, False, True]
    # A new process's gate knows the keys only from the store: the same exact answers.
    restarted = DedupGate(lookup, source)
    restarted.rebuild(len(stored))
    assert reads == [5000] and len(restarted.bloom.layers) == 1  # folded into one layer
    with restarted.lock:
        assert restarted.admit(["e1", "e4999", "new"]) == [False, False, True]
    assert restarted.lookups == 1  # one exact lookup for the whole batch


def test_failing_duplicate_lookup_is_503(settings: Settings, admin_headers: dict[str, str]) -> None:
    """After a restart the gate knows stored keys only from ClickHouse: a retry is a Bloom
    positive that needs an exact lookup; with ClickHouse not answering it, 503."""
    batch = {"events": [event(i) for i in range(5)]}

    def send(client: TestClient) -> Any:
        return client.post(
            "/v1/events",
            content=msgspec.json.encode(batch),
            headers={**admin_headers, "content-type": "application/json"},
        )

    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as first:
        wait_ready(app)
        assert send(first).json()["accepted"] == 5
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as second:
        store = wait_ready(app).events.store
        real = store.existing_ids

        def down(ids: list[str]) -> set[str]:
            raise ConnectionError("ClickHouse unreachable")

        store.existing_ids = down  # type: ignore[method-assign]
        response = send(second)
        store.existing_ids = real  # type: ignore[method-assign]
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"].startswith("cannot check for duplicates now")
        assert send(second).json()["duplicates"] == 5


def test_retries_of_pending_and_recent_keys_are_decided_without_a_lookup() -> None:
    """A batch of retries (a gateway resending 10,000 events) is answered from memory:
    keys still pending (spooled, not stored) and recently stored ones are duplicates,
    repeats inside the batch count once, and only a key neither layer knows is looked
    up, once."""
    looked_up: list[list[str]] = []

    def lookup(ids: list[str]) -> set[str]:
        looked_up.append(ids)
        return {"old"}

    gate = DedupGate(lookup, lambda: iter(()))
    stored_keys = [f"s{i}" for i in range(5_000)]
    pending_keys = [f"p{i}" for i in range(5_000)]
    with gate.lock:
        assert gate.admit(stored_keys) == [True] * 5_000
        gate.mark_pending(0, stored_keys)
        assert gate.admit(pending_keys, key_hashes(pending_keys)) == [True] * 5_000
        gate.mark_pending(1, pending_keys)
    gate.stored(0)
    gate.bloom.add(key_hashes(["old", "gone"]))  # Bloom positives no layer knows
    batch = [*pending_keys, *stored_keys, "new", "p1", "new", "old", "gone", "gone"]
    with gate.lock:
        fresh = gate.admit(batch)
    assert fresh == [False] * 10_000 + [True, False, False, False, True, False]
    assert looked_up == [["old", "gone"]]
