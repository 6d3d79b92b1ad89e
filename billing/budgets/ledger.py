"""Spend per budgeted scope and period, kept current as events are admitted.

This is what `POST /v1/authorize` reads: no database and no ClickHouse on its path, and
it reflects every event acknowledged before the call (read-your-writes), because the
ingest pipeline hands each admitted batch's usage to the ledger when the batch's spool
write completes, which is before the `202` leaves.

What is kept: for each tracked scope (a tenant, or a tenant's project, that has a
budget) and period (calendar month, UTC), the billable quantities (input tokens, output
tokens, doc-query pairs) per price entry. Spend is rated from those with
`billing.rating`, the same function as every other figure, so it is exact and agrees with
stats and invoices. Quantities, not amounts, are summed: rating a sum equals summing the
ratings (the formula is linear), and a sum of integers is cheaper per event.

Exactness against ClickHouse (start-up, a new budget, the minute's reconciliation, a
price book change) uses a cut on the ingest pipeline's record numbers (`seq`): the
caller stops the writer after record S, waits until records up to S are stored, reads the
scopes' usage from ClickHouse (everything up to S, nothing after), and hands it to
`finish_resync`; batches after S that were admitted meanwhile are added on top
(`begin_resync` starts collecting them). No event is counted twice or missed.

A mirror (`attach_mirror`) gets every change of what `check` reads, in the order the
changes happen (each is sent under the ledger's lock), starting with a snapshot: another
process that applies them (`apply`) answers `check` exactly as this ledger does, once it
has applied everything sent before. metering.budgets.replica serves authorize so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from billing.budgets.forecast import month_start, next_month_start, period_of
from billing.rating import EXACT, METERS, PriceBook, PriceEntry, meter_amount

Scope = tuple[str, str | None]  # (tenant_id, project_id or None for the whole tenant)
# A price entry's id, or ("unpriced", provider, model) for usage no entry covers.
PriceKey = str | tuple[str, str, str]
Quantities = list[int]  # [input_tokens, output_tokens, doc_query_pairs]
UsageMap = dict[tuple[Scope, str], dict[PriceKey, Quantities]]
# One change for a mirror: ("usage", {key: entry or None}), ("limits", [Limit, ...]),
# ("limit", Limit), ("drop", budget id), ("entries", {id: PriceEntry}), ("ready", bool).
Change = tuple[str, object]
# Background loops (a resync, the alert worker) sleep this long every PAUSE_EVERY items.
PAUSE_SECONDS = 0.0002
PAUSE_EVERY = 128


class BillableEvent(Protocol):
    """What the ledger reads of an event (read-only)."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def project_id(self) -> str: ...

    @property
    def provider(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def timestamp(self) -> datetime: ...

    @property
    def input_tokens(self) -> int: ...

    @property
    def output_tokens(self) -> int: ...

    @property
    def queries(self) -> int: ...

    @property
    def documents(self) -> int: ...


@dataclass(frozen=True)
class Limit:
    """What the ledger needs of a budget."""

    id: str
    tenant_id: str
    project_id: str | None
    amount: Decimal
    hard_limit: bool
    thresholds: tuple[Decimal, ...] = ()

    @property
    def scope(self) -> Scope:
        return (self.tenant_id, self.project_id)


@dataclass(frozen=True)
class Check:
    """One budget's standing in an authorize answer."""

    limit: Limit
    spend: Decimal
    unpriced: bool

    @property
    def exhausted(self) -> bool:
        return self.spend >= self.limit.amount

    @property
    def remaining(self) -> Decimal:
        return max(Decimal(0), EXACT.subtract(self.limit.amount, self.spend))


@dataclass
class _Resync:
    seq: int
    scopes: set[Scope]
    full: bool  # every tracked scope: the ledger is ready once one such resync ends
    generation: int  # the budgets' generation at the start
    # Usage of batches admitted after the cut, in arrival order (merged outside the lock).
    after: list[UsageMap] = field(default_factory=list)


def _merge_new(
    into: UsageMap, add: Mapping[tuple[Scope, str], Mapping[PriceKey, Quantities]]
) -> None:
    """Add `add` into `into` without changing any of its inner dicts or lists (each
    touched entry is replaced by a new one). The live map is changed only so: a resync
    can then compare a shallow copy of it (`dict(...)`, one C call) outside the lock,
    and what the copy holds stays as it was. A resync's own map is built so too: the
    entries it puts in the live map are the exact map's, never changed afterwards."""
    for key, by_price in add.items():
        before = into.get(key)
        target = dict(before) if before else {}
        for price_key, q in by_price.items():
            sums = target.get(price_key)
            target[price_key] = (
                list(q) if sums is None else [sums[0] + q[0], sums[1] + q[1], sums[2] + q[2]]
            )
        into[key] = target


def pause(count: int = -1, every: int = PAUSE_EVERY) -> None:
    """In a long loop of a background thread, hand the GIL over now and then (every
    `every` counts; at once without one): a thread running Python code keeps it up to the
    switch interval (5 ms) while the event loop waits for it once per turn, so
    `POST /v1/authorize` would wait too."""
    if count % every == every - 1:
        time.sleep(PAUSE_SECONDS)


class SpendLedger:
    """Thread-safe: admission threads add, the authorize path reads, a worker resyncs."""

    def __init__(self, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.now = now
        self._lock = threading.Lock()
        self._limits: dict[str, Limit] = {}
        self._by_tenant: dict[str, list[Limit]] = {}
        self._usage: UsageMap = {}
        self._spend: dict[tuple[Scope, str], tuple[Decimal, bool]] = {}
        self._book = PriceBook([])
        self._entries: dict[str, PriceEntry] = {}
        self._latest: dict[tuple[str, str], PriceEntry] = {}
        self._resync: _Resync | None = None
        self._changed: set[Scope] = set()
        self._generation = 0  # counts changes of the budgets (a resync checks it)
        self.ready = False  # built from ClickHouse at least once
        self.on_change: Callable[[], None] | None = None  # wakes the alert worker
        # Told every change, under the lock (see `attach_mirror`); it must not block long.
        self._mirror: Callable[[Change], None] | None = None

    # -- a mirror in another process ------------------------------------------------------

    def attach_mirror(self, mirror: Callable[[Change], None] | None) -> None:
        """From now on tell `mirror` every change, after a snapshot of the whole state
        (both under the lock, so nothing is missed or told twice). None detaches."""
        with self._lock:
            self._mirror = mirror
            if mirror is None:
                return
            mirror(("entries", dict(self._entries)))
            mirror(("limits", list(self._limits.values())))
            mirror(("usage", dict(self._usage)))
            mirror(("ready", self.ready))

    def _tell(self, change: Change) -> None:
        if self._mirror is not None:
            self._mirror(change)

    def apply(self, change: Change) -> None:
        """Apply a change a primary ledger told its mirror (this ledger is the mirror)."""
        kind, value = change
        with self._lock:
            if kind == "usage":
                assert isinstance(value, dict)
                for key, entry in value.items():
                    if entry is None:
                        self._usage.pop(key, None)
                    else:
                        self._usage[key] = entry
                    self._spend.pop(key, None)
            elif kind == "limits":
                assert isinstance(value, list)
                self._limits = {limit.id: limit for limit in value}
                self._index()
            elif kind == "limit":
                assert isinstance(value, Limit)
                self._limits[value.id] = value
                self._index()
            elif kind == "drop":
                assert isinstance(value, str)
                self._limits.pop(value, None)
                self._index()
            elif kind == "entries":
                assert isinstance(value, dict)
                self._entries = value
                self._spend.clear()
            elif kind == "ready":
                self.ready = bool(value)
            else:
                raise ValueError(f"unknown ledger change {kind!r}")

    # -- budgets and prices ---------------------------------------------------------------

    def set_limits(self, limits: Iterable[Limit]) -> set[Scope]:
        """Replace the budgets; returns the scopes that were not tracked before (their
        spend must be read from ClickHouse: `begin_resync(scopes)`). The new maps are
        built before the lock is taken (the minute's reload passes every budget)."""
        new = {limit.id: limit for limit in limits}
        current = self._limits
        if new == current:
            return set()
        after = {limit.scope for limit in new.values()}
        before = {limit.scope for limit in current.values()}
        by_tenant = _by_tenant(new.values())
        with self._lock:
            if self._limits is not current:  # changed meanwhile (an edit): look again
                before = self._tracked()
            self._limits = new
            self._by_tenant = by_tenant
            self._generation += 1
            self._tell(("limits", list(new.values())))
            if before - after:
                gone = [k for k in self._usage if k[0] not in after]
                for key in gone:
                    del self._usage[key]
                    self._spend.pop(key, None)
                self._tell(("usage", dict.fromkeys(gone)))
            return after - before

    def put_limit(self, limit: Limit) -> bool:
        """Add or change one budget; True if its scope is new (needs a resync)."""
        with self._lock:
            new = limit.scope not in self._tracked()
            self._limits[limit.id] = limit
            self._index()
            self._changed.add(limit.scope)
            self._tell(("limit", limit))
        self._notify()
        return new

    def drop_limit(self, budget_id: str) -> None:
        with self._lock:
            self._limits.pop(budget_id, None)
            self._index()
            self._tell(("drop", budget_id))

    def _index(self) -> None:
        self._by_tenant = _by_tenant(self._limits.values())
        self._generation += 1

    def _tracked(self) -> set[Scope]:
        return {limit.scope for limit in self._limits.values()}

    def tracked(self) -> set[Scope]:
        with self._lock:
            return self._tracked()

    def limits(self) -> list[Limit]:
        with self._lock:
            return list(self._limits.values())

    def limits_of(self, scopes: set[Scope]) -> list[Limit]:
        """The budgets of these scopes (through the per-tenant index, not a scan)."""
        by_tenant = self._by_tenant
        tenants = {scope[0] for scope in scopes}
        return [
            limit
            for tenant in tenants
            for limit in by_tenant.get(tenant, ())
            if limit.scope in scopes
        ]

    def limit(self, budget_id: str) -> Limit | None:
        with self._lock:
            return self._limits.get(budget_id)

    def set_book(self, book: PriceBook) -> bool:
        """Use `book` from now on; True if its entries differ from the last one's (spend
        must then be resynced: an entry may apply to usage already counted)."""
        entries = {e.id: e for e in book.entries}
        with self._lock:
            if entries == self._entries:
                self._book = book  # the same prices: the rated spend stays valid
                return False
            changed = entries.keys() != self._entries.keys()
            self._book = book
            self._entries = entries
            latest: dict[tuple[str, str], PriceEntry] = {}
            for e in book.entries:
                key = (e.provider, e.model)
                if key not in latest or e.effective_from > latest[key].effective_from:
                    latest[key] = e
            self._latest = latest
            self._spend.clear()
            self._tell(("entries", dict(entries)))
        return changed

    @property
    def book(self) -> PriceBook:
        return self._book

    # -- admission ------------------------------------------------------------------------

    def prepare(self, items: Sequence[BillableEvent]) -> UsageMap | None:
        """The usage of a batch's admitted events for tracked scopes (None if none).
        Called on the request path outside any lock of the pipeline: cheap when the
        batch's tenants have no budget (one dict lookup per event)."""
        by_tenant = self._by_tenant
        if not by_tenant:
            return None
        now = self.now()
        current = month_start(now)
        following = next_month_start(now)
        this_period = period_of(now)
        out: UsageMap = {}
        latest = self._latest
        book = self._book
        for e in items:
            limits = by_tenant.get(e.tenant_id)
            if limits is None or e.status != "ok":
                continue
            ts = e.timestamp
            if ts < current:
                continue  # a late event of a past period: no budget counts it any more
            period = this_period if ts < following else period_of(ts)
            entry = latest.get((e.provider, e.model))
            if entry is None or ts < entry.effective_from:
                entry = book.price_at(e.provider, e.model, ts)
            price_key: PriceKey = (
                entry.id if entry is not None else ("unpriced", e.provider, e.model)
            )
            q = (e.input_tokens, e.output_tokens, e.queries * e.documents)
            seen: set[Scope] = set()
            for limit in limits:
                scope = limit.scope
                if scope in seen or (scope[1] is not None and scope[1] != e.project_id):
                    continue
                seen.add(scope)
                sums = out.setdefault((scope, period), {}).setdefault(price_key, [0, 0, 0])
                sums[0] += q[0]
                sums[1] += q[1]
                sums[2] += q[2]
        return out or None

    def durable(self, seq: int, usage: UsageMap) -> None:
        """The batch `seq` is on disk (its 202 may leave now): count its usage."""
        with self._lock:
            _merge_new(self._usage, usage)
            resync = self._resync
            if resync is not None and seq > resync.seq:
                resync.after.append(usage)
            for scope, _period in usage:
                self._spend.pop((scope, _period), None)
                self._changed.add(scope)
            if self._mirror is not None:
                self._mirror(("usage", {key: self._usage[key] for key in usage}))
        self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- exact rebuild against ClickHouse -------------------------------------------------

    def begin_resync(self, seq: int, scopes: set[Scope] | None = None) -> set[Scope]:
        """Records up to `seq` will be read from ClickHouse for `scopes` (None: every
        tracked scope); collect what is admitted after. Returns the scopes to read."""
        with self._lock:
            full = scopes is None
            chosen = self._tracked() if scopes is None else set(scopes)
            self._resync = _Resync(seq, chosen, full, self._generation)
            return set(chosen)

    def abort_resync(self) -> None:
        with self._lock:
            self._resync = None

    def finish_resync(self, base: UsageMap) -> dict[Scope, Decimal]:
        """Set the resynced scopes to `base` (ClickHouse, records up to the cut) plus what
        was admitted after the cut. Returns each scope's drift in the current period
        (ledger before minus exact after), for the reconciliation's report.

        The lock is held only for C-speed steps: to copy the live map (shallow: `durable`
        never changes an entry it placed, see `_merge_new`) with the count of batches
        admitted after the cut, and at the end to add the few batches since and put the
        changed entries in. Building the exact map and comparing it with the copy (which
        entries differ, the drift) run outside it, pausing now and then for the GIL, so
        neither authorize nor the event loop waits behind a reconciliation."""
        with self._lock:
            resync = self._resync
            assert resync is not None, "finish_resync without begin_resync"
            taken = len(resync.after)
            live = dict(self._usage)
        scopes = resync.scopes
        fresh: UsageMap = {}
        for n, (key, by_price) in enumerate(base.items()):
            if key[0] in scopes:
                fresh[key] = by_price  # the caller's: the ledger's from here on
            pause(n)
        for usage in resync.after[:taken]:
            _merge_new(fresh, {k: v for k, v in usage.items() if k[0] in scopes})
        # Entries of the resynced scopes that differ between the ledger (as copied) and
        # the exact map: the same batches are in both, so they differ only by drift.
        differs: set[tuple[Scope, str]] = set()
        for n, key in enumerate(live.keys() | fresh.keys()):
            if key[0] in scopes and live.get(key) != fresh.get(key):
                differs.add(key)
            pause(n)
        entries = self._entries
        period = period_of(self.now())
        drift = {s: Decimal(0) for s in scopes}
        for scope, key_period in differs:
            if key_period == period:
                drift[scope] = EXACT.subtract(
                    _rated(live.get((scope, period), {}), entries)[0],
                    _rated(fresh.get((scope, period), {}), entries)[0],
                )
        with self._lock:
            for usage in resync.after[taken:]:
                mine = {k: v for k, v in usage.items() if k[0] in scopes}
                _merge_new(fresh, mine)
                differs.update(mine)  # their cached spend went with `durable` already
            self._resync = None
            tracked = self._tracked() if self._generation != resync.generation else None
            # Only the entries that differ are replaced (or dropped: none in ClickHouse):
            # the others hold equal values, and keeping them leaves a map's worth of
            # objects to free outside the lock.
            for key in differs:
                if key in fresh and (tracked is None or key[0] in tracked):
                    self._usage[key] = fresh.pop(key)
                else:
                    self._usage.pop(key, None)
                self._spend.pop(key, None)
            # Thresholds are checked again where spend changed (everywhere at the first
            # build): an exact reconciliation that found no drift costs no re-check.
            self._changed |= scopes if not self.ready else {key[0] for key in differs}
            if self._mirror is not None:
                self._mirror(("usage", {key: self._usage.get(key) for key in differs}))
            if resync.full and not self.ready:
                self.ready = True
                self._tell(("ready", True))
        self._notify()
        del live
        _release(fresh)
        return drift

    # -- reads ----------------------------------------------------------------------------

    def _spend_of(self, scope: Scope, period: str) -> tuple[Decimal, bool]:
        """(spend, has unpriced usage) of a scope in a period. Caller holds the lock."""
        key = (scope, period)
        cached = self._spend.get(key)
        if cached is not None:
            return cached
        rated = _rated(self._usage.get(key, {}), self._entries)
        self._spend[key] = rated
        return rated

    def spend(self, scope: Scope, period: str | None = None) -> tuple[Decimal, bool]:
        with self._lock:
            return self._spend_of(scope, period or period_of(self.now()))

    def check(self, tenant_id: str, project_id: str | None) -> list[Check]:
        """The budgets covering (tenant, project) in the current period: the tenant's
        tenant-wide budgets and the project's own (tenant-wide only without a project)."""
        period = period_of(self.now())
        with self._lock:
            out = []
            for limit in self._by_tenant.get(tenant_id, ()):
                if limit.project_id is not None and limit.project_id != project_id:
                    continue
                spend, unpriced = self._spend_of(limit.scope, period)
                out.append(Check(limit, spend, unpriced))
            return out

    def take_changed(self) -> set[Scope]:
        """Scopes whose spend changed since the last call (for the alert worker)."""
        with self._lock:
            changed, self._changed = self._changed, set()
            return changed

    def usage(self, scope: Scope, period: str) -> dict[PriceKey, Quantities]:
        with self._lock:
            return {k: list(v) for k, v in self._usage.get((scope, period), {}).items()}

    def periods_from(self) -> datetime:
        """The earliest instant whose usage the ledger keeps: the current month's start."""
        return month_start(self.now())

    def roll(self) -> None:
        """Forget periods before the current one (called now and then by the worker)."""
        current = period_of(self.now())
        with self._lock:
            gone = [k for k in self._usage if k[1] < current]
            for key in gone:
                del self._usage[key]
            for key in [k for k in self._spend if k[1] < current]:
                del self._spend[key]
            if gone:
                self._tell(("usage", dict.fromkeys(gone)))


def _release(usage: UsageMap) -> None:
    """Empty a big map a slice at a time: freed at once, its objects' deallocation is one
    C call holding the GIL for tens of ms."""
    for n in range(len(usage)):
        usage.popitem()
        pause(n)


def _by_tenant(limits: Iterable[Limit]) -> dict[str, list[Limit]]:
    by_tenant: dict[str, list[Limit]] = {}
    for limit in limits:
        by_tenant.setdefault(limit.tenant_id, []).append(limit)
    return by_tenant


def _rated(
    usage: Mapping[PriceKey, Quantities], entries: Mapping[str, PriceEntry]
) -> tuple[Decimal, bool]:
    """(spend, has unpriced usage) of one scope's quantities per price entry."""
    total = Decimal(0)
    unpriced = False
    for price_key, q in usage.items():
        entry = entries.get(price_key) if isinstance(price_key, str) else None
        if entry is None:
            unpriced = unpriced or any(q)
            continue
        for quantity, meter in zip(q, METERS, strict=True):
            if quantity:
                total = EXACT.add(total, meter_amount(quantity, entry.unit_price(meter), meter))
    return total, unpriced
