"""The platform's figures of closed whole hours, kept between reads and proved current.

`/v1/stats` for the platform (the seed page's cards, and the dashboard's) sums a window
of whole hours and two partial ones at its edges. The whole hours are read from
projections, but every query costs several milliseconds of planning whatever it reads
(five projections to weigh, per part), and a 30-day window needs five of them. The
whole hours' part of the answer (their facts, the set of their tenants' numbers, their
probe counts) changes only when rows with a timestamp in them are stored later. So it
is kept here, per window of whole hours, and reused while ClickHouse shows that no such
row has been stored since; the edges are always read live (one query for events, one
for probes), and so is the proof (one query of `system.parts`).

The proof, exact on any replica, because it asks ClickHouse, not this process:
- Every insert takes a block number above every one taken before it (when it starts:
  it may commit after a later one) and makes a part of it; merges and mutations make
  parts whose block range covers the parts they replace. The parts' names, block
  ranges, data versions and the minimum timestamp of their rows are in `system.parts`.
- The cached figures were read after a snapshot of the active parts was taken, so they
  hold at least the rows of those parts (rows stored after the snapshot may be in them
  too).
- At a later read, if every active part is in that snapshot, or was never rewritten by
  a mutation (its data_version is still its first block: inserts and merges only, which
  keep rows) and has its earliest row at or after the end of the whole hours (then none
  of its rows, nor of any part it took in, is before that end), or is a merge of parts
  of the snapshot (their block ranges tile its own with no gap, none of them mutated),
  and every part of the snapshot is still there or inside a part that is (nothing
  dropped), then the rows before that end are exactly those of the snapshot: the
  cached figures are current. Otherwise (late rows in those hours, a mutation, an
  insert that committed after the snapshot with an older block number, a dropped
  partition) they are read again. The service never updates or deletes event rows.
- A proved read makes its own snapshot the baseline, so parts written since are known
  when a merge later takes them in: under steady ingest, the whole hours are read again
  only when rows land in them (or a merge takes in a part no read has seen).

`HoursCache.facts` keeps the whole hours of any `/v1/usage` read the same way (one
tenant's, grouped or not, per bucket); hits and misses of both are counted in /metrics
(`metering_figures_whole_hours_total`). A tenant's `/v1/stats` is read directly: it is
one query of `p_tenant_hourly` and needs no set of tenants.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt
from clickhouse_connect.driver.client import Client

from billing.rating import PriceBook
from metering.analytics.facts import (
    Fact,
    edge_facts,
    fact_queries,
    facts,
    probe_counts,
    probe_counts_in,
    read_facts,
    tenant_numbers,
)
from metering.analytics.window import Window, ceil_hour, floor_hour
from metering.metrics import FIGURES_CACHE

# Reads of one figure: the caller runs them (at once, each on a client of its own, or one
# after another on one client) and returns their results in order.
T = TypeVar("T")
V = TypeVar("V")
Runner = Callable[[Sequence[Callable[[Client], Any]]], list[Any]]

TABLES = ("rerank_events", "uptime_probes")
PARTS = (
    "SELECT table, partition_id, name, min_block_number, max_block_number,"
    " toUnixTimestamp(min_time), data_version FROM system.parts"
    " WHERE database = currentDatabase() AND active"
    " AND table IN ('rerank_events', 'uptime_probes')"
)
MAX_ENTRIES = 16  # platform figures: one per window of whole hours asked
MAX_FACT_ENTRIES = 1024  # facts: one per (window of whole hours, filters, grouping, bucket)
MAX_KEPT_FACTS = 20_000  # a larger answer (usage grouped by tenant, say) is not kept


@dataclass(frozen=True, slots=True)
class Part:
    partition: str
    min_block: int
    max_block: int
    min_time: int  # Unix seconds, rounded down (ClickHouse's min_time of the part)
    data_version: int = 0  # min_block until a mutation rewrites the part

    @property
    def unmutated(self) -> bool:
        return self.data_version == self.min_block


Snapshot = dict[str, dict[str, Part]]  # table -> part name -> part


def snapshot(ch: Client) -> Snapshot:
    out: Snapshot = {table: {} for table in TABLES}
    for table, partition, name, lo, hi, min_time, version in ch.query(PARTS).result_rows:
        out[table][name] = Part(partition, int(lo), int(hi), int(min_time), int(version))
    return out


def _merge_of_known(before: dict[str, Part], part: Part) -> bool:
    """`part` holds exactly the rows of parts in `before`: a merge (no mutation on either
    side) of parts whose block ranges tile its own with no gap. A block in the range that
    no known part held (an insert that committed after `before` was taken) leaves a gap."""
    if not part.unmutated:
        return False
    inside = sorted(
        (p for p in before.values()
         if p.partition == part.partition
         and part.min_block <= p.min_block and p.max_block <= part.max_block),
        key=lambda p: p.min_block,
    )  # fmt: skip
    if not inside or not all(p.unmutated for p in inside):
        return False
    expected = part.min_block
    for p in inside:
        if p.min_block != expected:
            return False
        expected = p.max_block + 1
    return expected == part.max_block + 1


def unchanged_before(old: Snapshot, new: Snapshot, end: datetime) -> bool:
    """True when the rows with a timestamp before `end` in `new`'s parts are exactly
    those of `old`'s (see the module's docstring)."""
    end_s = int(end.timestamp())
    for table in TABLES:
        before, now = old.get(table, {}), new.get(table, {})
        for name, part in now.items():
            if name in before:
                continue
            if part.unmutated and part.min_time >= end_s:
                # Inserts and merges only keep rows, so none of its rows is before
                # `end`, nor was any of a part it took in.
                continue
            if _merge_of_known(before, part):
                continue  # the same rows, merged
            return False
        for name, part in before.items():
            if name not in now and not any(
                q.partition == part.partition
                and q.min_block <= part.min_block
                and part.max_block <= q.max_block
                for q in now.values()
            ):
                return False
    return True


@dataclass(frozen=True)
class WholeHours:
    """The platform's figures of [start, end), both whole hours."""

    facts: list[Fact]
    tenants: npt.NDArray[np.uint32]  # sorted: 4 bytes a tenant (210K: 0.8 MB)
    probes: dict[str, tuple[int, int]]
    seen: Snapshot  # taken before they were read


@dataclass(frozen=True)
class Platform:
    """Everything /v1/stats needs for the platform."""

    facts: list[Fact]
    accounts: int
    probes: dict[str, tuple[int, int]]


Counts = dict[str, tuple[int, int]]  # provider -> (ok probes, probes)


def _add(a: Counts, b: Counts) -> Counts:
    out = dict(a)
    for provider, (ok, n) in b.items():
        ok0, n0 = out.get(provider, (0, 0))
        out[provider] = (ok0 + ok, n0 + n)
    return out


def _not_in(numbers: set[int], sorted_numbers: npt.NDArray[np.uint32]) -> int:
    """How many of `numbers` are not in `sorted_numbers`."""
    if not len(sorted_numbers):
        return len(numbers)
    probe = np.fromiter(numbers, np.uint32, len(numbers))
    at = np.minimum(np.searchsorted(sorted_numbers, probe), len(sorted_numbers) - 1)
    return int(np.count_nonzero(sorted_numbers[at] != probe))


class _Lru(Generic[V]):
    """At most `size` values, the least recently used dropped first; thread-safe."""

    def __init__(self, size: int) -> None:
        self._values: OrderedDict[tuple[Any, ...], V] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> V | None:
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
            return value

    def put(self, key: tuple[Any, ...], value: V) -> None:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self._size:
                self._values.popitem(last=False)

    def refresh(self, key: tuple[Any, ...], value: V) -> None:
        """Replace the value under `key` if it is still kept."""
        with self._lock:
            if key in self._values:
                self._values[key] = value

    def pop(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            self._values.pop(key, None)


class HoursCache:
    """Whole-hour figures per window of whole hours (and price boundaries), newest used
    kept (at most MAX_ENTRIES)."""

    def __init__(self) -> None:
        self._entries: _Lru[WholeHours] = _Lru(MAX_ENTRIES)
        self._facts: _Lru[tuple[list[Fact], Snapshot]] = _Lru(MAX_FACT_ENTRIES)
        self._kept: _Lru[tuple[object, Snapshot]] = _Lru(MAX_FACT_ENTRIES)
        self.hits = 0
        self.misses = 0

    def facts(
        self,
        run: Runner,
        window: Window,
        boundaries: Sequence[datetime],
        *,
        filters: dict[str, str],
        group: Sequence[str] = (),
        bucket: str | None = "hour",
    ) -> list[Fact]:
        """`facts.facts` of the window, its whole hours kept and proved like the
        platform's (any filters, grouping and bucket: one tenant's usage, say)."""
        q = fact_queries(window, boundaries, filters=filters, group=group, bucket=bucket)

        def raw(ch: Client) -> list[Fact]:
            return read_facts(ch, q.raw, q.raw_params, q.keys) if q.raw else []

        if q.hours is None or q.hours_end is None:
            return list(run([raw])[0])
        hours_sql, hours_end = q.hours, q.hours_end

        def hours(ch: Client) -> list[Fact]:
            return read_facts(ch, hours_sql, q.hours_params, q.keys)

        key = (hours_sql, repr(sorted(q.hours_params.items())))
        cached = self._facts.get(key)
        hour_rows: list[Fact]
        raw_rows: list[Fact]
        seen: Snapshot
        if cached is None:  # the snapshot must be taken before the hours are read
            seen = run([snapshot])[0]
            hour_rows, raw_rows = run([hours, raw])
        else:
            seen, raw_rows = run([snapshot, raw])
            if unchanged_before(cached[1], seen, hours_end):
                self.hits += 1
                FIGURES_CACHE.labels("facts", "hit").inc()
                self._facts.refresh(key, (cached[0], seen))  # proved: the newer baseline
                return cached[0] + raw_rows
            hour_rows = run([hours])[0]
        self.misses += 1
        FIGURES_CACHE.labels("facts", "miss").inc()
        if len(hour_rows) > MAX_KEPT_FACTS:  # memory stays bounded: ~2 KB a fact at most
            self._facts.pop(key)
            return hour_rows + raw_rows
        self._facts.put(key, (hour_rows, seen))
        return hour_rows + raw_rows

    def kept(
        self, ch: Client, key: tuple[Any, ...], end: datetime, read: Callable[[Client], T]
    ) -> T:
        """`read(ch)`, an answer that depends only on rows before `end`, kept under `key`
        and proved current like the whole hours (one query of system.parts on a hit)."""
        seen = snapshot(ch)
        cached = self._kept.get(key)
        if cached is not None and unchanged_before(cached[1], seen, end):
            FIGURES_CACHE.labels("kept", "hit").inc()
            self._kept.refresh(key, (cached[0], seen))
            return cast(T, cached[0])
        FIGURES_CACHE.labels("kept", "miss").inc()
        value = read(ch)
        self._kept.put(key, (value, seen))
        return value

    def platform(self, run: Runner, book: PriceBook, window: Window) -> Platform:
        """The platform's facts (one bucket for the window), active accounts and probe
        counts of `window`, exact."""
        start, end = window.start, window.end
        h1, h2 = ceil_hour(start), floor_hour(end)
        origin = floor_hour(start)
        boundaries = book.boundaries(origin, end)
        if h1 >= h2:  # no whole hour: all of it is an edge
            (rows, tenant_set), probes = run(
                [
                    lambda ch: edge_facts(ch, [(start, end)], boundaries, origin),
                    lambda ch: probe_counts(ch, window),
                ]
            )
            return Platform(rows, len(tenant_set), probes)
        ranges = [r for r in ((start, h1), (h2, end)) if r[0] < r[1]]
        key = (h1, h2, tuple(book.boundaries(h1, h2)))
        cached = self._entries.get(key)
        seen, edges, edge_probes = run(
            [
                snapshot,
                lambda ch: edge_facts(ch, ranges, boundaries, origin) if ranges else ([], set()),
                lambda ch: probe_counts_in(ch, ranges) if ranges else {},
            ]
        )
        if cached is not None and unchanged_before(cached.seen, seen, h2):
            self.hits += 1
            FIGURES_CACHE.labels("platform", "hit").inc()
            # Proved against `seen`: it is as good a baseline, and knows the parts
            # written since, so their later merges prove too.
            cached = replace(cached, seen=seen)
            self._entries.put(key, cached)
        else:
            self.misses += 1
            FIGURES_CACHE.labels("platform", "miss").inc()
            hours = Window(h1, h2)
            hour_boundaries = book.boundaries(h1, h2)
            hour_facts, tenants, probes = run(
                [
                    lambda ch: facts(ch, hours, hour_boundaries, filters={}, bucket=None),
                    lambda ch: tenant_numbers(ch, hours),
                    lambda ch: probe_counts(ch, hours),
                ]
            )
            cached = WholeHours(hour_facts, tenants, probes, seen)
            self._entries.put(key, cached)
        edge_rows, edge_tenants = edges
        accounts = len(cached.tenants) + _not_in(edge_tenants, cached.tenants)
        return Platform(cached.facts + edge_rows, accounts, _add(cached.probes, edge_probes))


def sequential(ch: Client) -> Runner:
    """A Runner that reads one after another on one client."""

    def run(reads: Sequence[Callable[[Client], Any]]) -> list[Any]:
        return [read(ch) for read in reads]

    return run
