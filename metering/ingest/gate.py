"""The dedup gate: decides, exactly, whether an idempotency key was ever stored.

Three layers, cheapest first:
1. a Bloom filter over every stored key (no false negatives): a key it has never seen
   is new, which is the answer for nearly every key of live traffic;
2. the keys admitted but not yet stored in ClickHouse (`pending`) and the most recently
   stored ones (`recent`), both exact, in memory: where gateway retries land;
3. the `ingested_ids` table in ClickHouse, an exact primary-key lookup, asked only for
   the rare Bloom false positive (~1 in 10,000 keys) and for old retries.

Admission and the bookkeeping after a store are serialized by one lock, so two requests
carrying the same key at once cannot both be admitted. The gate is rebuilt at startup
from `ingested_ids` (after the spool tail is replayed), so it holds no state that a crash
can lose. It is single-process state: docs/exactly-once.md says how several API
replicas share the decision.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
import numpy.typing as npt


def _fast_md5() -> Callable[[bytes], Any]:
    """CPython's own MD5 (same digests): ~3x faster than OpenSSL's for short keys, which
    sets up an EVP context per call; OpenSSL's where the build lacks it."""
    try:
        return cast(Callable[[bytes], Any], importlib.import_module("_md5").md5)
    except (ImportError, AttributeError):  # pragma: no cover - a build without it
        return hashlib.md5


_md5 = _fast_md5()

FALSE_POSITIVE_RATE = 1e-4
MIN_CAPACITY = 4_000_000
RECENT_GENERATION = 100_000
# A full filter gets a new layer GROWTH times its size at TIGHTEN times its false-positive
# rate: however many layers, the rate stays under FALSE_POSITIVE_RATE / (1 - TIGHTEN).
GROWTH = 2
TIGHTEN = 0.5

Lookup = Callable[[list[str]], set[str]]
# Yields the hashes (see key_hashes) of every stored key, in chunks.
HashSource = Callable[[], Iterable[npt.NDArray[np.uint64]]]
# Where a batch's keys sit in a Bloom filter: byte offsets and bit masks, (n, k) each.
Positions = tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]


def key_hashes(keys: Iterable[str]) -> npt.NDArray[np.uint64]:
    """(n, 2) uint64: the two little-endian halves of MD5(key), as ClickHouse computes
    them with reinterpretAsUInt64(substring(MD5(id), 1|9, 8))."""
    md5 = _md5
    digest = b"".join([md5(k.encode()).digest() for k in keys])
    return np.frombuffer(digest, dtype="<u8").reshape(-1, 2)


class BloomFilter:
    """A standard Bloom filter over MD5 double hashing, sized for `capacity` keys."""

    def __init__(self, capacity: int, fp_rate: float = FALSE_POSITIVE_RATE) -> None:
        self.capacity = capacity
        bits = math.ceil(-capacity * math.log(fp_rate) / (math.log(2) ** 2))
        self.m = np.uint64(bits)
        self.k = max(1, round(bits / capacity * math.log(2)))
        self._steps = np.arange(self.k, dtype=np.uint64)
        self._bits = np.zeros(bits // 8 + 1, dtype=np.uint8)
        self.count = 0

    @property
    def nbytes(self) -> int:
        return int(self._bits.nbytes)

    def positions(self, hashes: npt.NDArray[np.uint64]) -> Positions:
        """The bytes and bit masks of the keys' bits (`contains` and `add` take them, so
        a batch of new keys computes them once)."""
        with np.errstate(over="ignore"):
            idx = (hashes[:, 0:1] + hashes[:, 1:2] * self._steps) % self.m
        return (idx >> np.uint64(3)).astype(np.int64), (
            np.uint8(1) << (idx & np.uint64(7)).astype(np.uint8)
        )

    def contains(
        self, hashes: npt.NDArray[np.uint64], at: Positions | None = None
    ) -> npt.NDArray[np.bool_]:
        if len(hashes) == 0:
            return np.zeros(0, dtype=bool)
        byte, mask = self.positions(hashes) if at is None else at
        return np.asarray(((self._bits[byte] & mask) != 0).all(axis=1))

    def add(self, hashes: npt.NDArray[np.uint64], at: Positions | None = None) -> None:
        if len(hashes) == 0:
            return
        byte, mask = self.positions(hashes) if at is None else at
        byte, mask = byte.ravel(), mask.ravel()
        # Fancy-index |= loses updates when two positions share a byte; redo those.
        self._bits[byte] |= mask
        lost = (self._bits[byte] & mask) == 0
        if lost.any():
            np.bitwise_or.at(self._bits, byte[lost], mask[lost])
        self.count += len(hashes)


class GrowingBloom:
    """Bloom filters in layers: when the newest is full, a new one twice its size, at half
    its false-positive rate, takes the adds, and a key is in if any layer has it.

    A full filter used to be rebuilt from every stored key in ClickHouse, on the event
    loop under the gate's lock: each time the stored keys doubled, every request waited
    for it (1.6-3.3 s at 4-8M keys on two cores, and longer with more keys). Growing in
    layers costs nothing at the moment of growth (a zeroed array), and a check one
    lookup per layer (about log2 of the keys over the first layer's capacity). A restart
    folds the layers back into one filter (`DedupGate.rebuild`).
    """

    def __init__(self, capacity: int, fp_rate: float = FALSE_POSITIVE_RATE) -> None:
        self.fp_rate = fp_rate
        self.layers = [BloomFilter(capacity, fp_rate)]

    @property
    def count(self) -> int:
        return sum(layer.count for layer in self.layers)

    @property
    def capacity(self) -> int:
        return sum(layer.capacity for layer in self.layers)

    def positions(self, hashes: npt.NDArray[np.uint64]) -> Positions:
        """The keys' positions in the newest layer (where `add` puts them)."""
        return self.layers[-1].positions(hashes)

    def contains(
        self, hashes: npt.NDArray[np.uint64], at: Positions | None = None
    ) -> npt.NDArray[np.bool_]:
        found = self.layers[-1].contains(hashes, at)
        for layer in self.layers[:-1]:
            found |= layer.contains(hashes)
        return found

    def add(self, hashes: npt.NDArray[np.uint64], at: Positions | None = None) -> None:
        newest = self.layers[-1]
        if newest.count + len(hashes) > newest.capacity:
            newest = BloomFilter(
                max(GROWTH * newest.capacity, len(hashes)),
                self.fp_rate * TIGHTEN ** len(self.layers),
            )
            self.layers.append(newest)
            at = None  # positions in the layer before
        newest.add(hashes, at)


class DedupGate:
    """Exact "seen before?" for one stream's idempotency keys."""

    def __init__(self, lookup: Lookup, source: HashSource) -> None:
        self._lookup = lookup
        self._source = source
        self.lock = threading.Lock()
        self.bloom = GrowingBloom(MIN_CAPACITY)
        # Admitted, not yet stored: (spool record seq, its keys), oldest first. Usually a
        # few records; asked only about Bloom positives, so a scan is cheap.
        self._pending: deque[tuple[int, set[str]]] = deque()
        self._recent: set[str] = set()
        self._recent_old: set[str] = set()
        self.lookups = 0

    def rebuild(self, expected: int = 0) -> None:
        """Refill the filter from every stored key, in one layer sized for twice what is
        there (at startup: after that the filter grows in layers, see GrowingBloom)."""
        with self.lock:
            self._rebuild(max(MIN_CAPACITY, 2 * expected))

    def _rebuild(self, capacity: int) -> None:
        bloom = GrowingBloom(capacity)
        for chunk in self._source():
            bloom.add(chunk)
        for _, keys in self._pending:
            bloom.add(key_hashes(keys))
        if bloom.count > capacity // 2:  # more than `expected` said
            self._rebuild(2 * bloom.count)
            return
        self.bloom = bloom

    def admit(self, keys: list[str], hashes: npt.NDArray[np.uint64] | None = None) -> list[bool]:
        """For each key, True if it was never stored nor admitted (repeats inside `keys`
        count once). `hashes` are `key_hashes(keys)` when the caller computed them before
        taking the lock. Caller holds `lock` and must follow with `pending` or `release`."""
        if hashes is None:
            hashes = key_hashes(keys)
        if len(hashes) == 0:
            return []
        at = self.bloom.positions(hashes)
        maybe = self.bloom.contains(hashes, at)
        if not maybe.any() and len(set(keys)) == len(keys):
            # The common case: every key is new and none repeats.
            self.bloom.add(hashes, at)
            return [True] * len(keys)
        # Bloom positives are checked against the exact in-memory layers with set
        # operations (a batch of 10,000 retries is a few C-level passes, not 10,000
        # scans of the pending records); what is left goes to one exact lookup.
        positives = {keys[i] for i in np.flatnonzero(maybe).tolist()}
        known = (positives & self._recent) | (positives & self._recent_old)
        for _, pending in self._pending:
            known |= positives & pending
        unsure = positives - known
        if unsure:
            self.lookups += 1
            # In batch order, once each (the lookup's input as before).
            known |= self._lookup([key for key in dict.fromkeys(keys) if key in unsure])
        fresh: list[bool] = []
        seen_here: set[str] = set()
        for key in keys:
            fresh.append(key not in seen_here and key not in known)
            seen_here.add(key)
        self.bloom.add(hashes[np.fromiter(fresh, dtype=bool, count=len(keys))])
        return fresh

    def mark_pending(self, seq: int, keys: list[str]) -> None:
        """The admitted keys are in the spool as record `seq` (caller holds `lock`)."""
        self._pending.append((seq, set(keys)))

    def release(self, seq: int) -> None:
        """Record `seq` never reached the spool: its keys were not accepted after all."""
        with self.lock:
            self._pending = deque((s, keys) for s, keys in self._pending if s != seq)

    def stored(self, upto_seq: int) -> None:
        """Records up to `upto_seq` are in ClickHouse: move their keys to `recent`."""
        with self.lock:
            while self._pending and self._pending[0][0] <= upto_seq:
                _, keys = self._pending.popleft()
                self._recent.update(keys)
                if len(self._recent) >= RECENT_GENERATION:
                    self._recent_old = self._recent
                    self._recent = set()

    @property
    def pending_count(self) -> int:
        with self.lock:  # the deque changes under the lock on other threads
            return sum(len(keys) for _, keys in self._pending)
