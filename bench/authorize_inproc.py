"""In-process figures of the budgets' spend ledger (billing.budgets.ledger.SpendLedger).

- `check(tenant, project)` with N tenants of which a fraction have budgets (tenant-wide,
  per project or both, some hard), each budgeted scope holding usage under 1-3 price
  entries: for tenants drawn from all (mostly unbudgeted), for budgeted tenants with the
  spend cache warm, and for budgeted tenants with it cold (right after a `durable` that
  touched every scope, so each check rates its scopes' usage again).
- `prepare` per event of 1,000-event batches of bench/loadgen.py events (decoded into the
  service's `Event` structs) with budgets on a fraction of their tenants.

Baseline, same loop: `json.dumps` of a small dict ({"tenant_id", "project_id"}). Each
figure is the median of R rounds of per-call time (perf_counter_ns over the whole loop).
The process tunes its collector as `metering serve` does (collect, freeze, threshold).
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from bench import loadgen
from bench.authorize_setup import LOADGEN_SEED, MODELS, PRICE_FROM, universe
from billing.budgets.forecast import period_of
from billing.budgets.ledger import Limit, SpendLedger, UsageMap
from billing.rating import PriceBook, PriceEntry
from metering.ingest.structs import Event


class _TimedLock:
    """A lock that remembers its longest hold (seconds) since `longest` was reset."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since = 0.0
        self.longest = 0.0

    def __enter__(self) -> bool:
        self._lock.acquire()
        self._since = time.perf_counter()
        return True

    def __exit__(self, *exc: object) -> None:
        self.longest = max(self.longest, time.perf_counter() - self._since)
        self._lock.release()


def _book() -> PriceBook:
    start = datetime.fromisoformat(PRICE_FROM)
    entries = [
        PriceEntry(
            id=f"price_{n:02d}",
            provider=provider,
            model=model,
            effective_from=start,
            currency="USD",
            input_per_1m_tokens=Decimal("0.10") + Decimal(n) / 100,
            output_per_1m_tokens=Decimal(0),
            per_1k_doc_query_pairs=Decimal("0.20") + Decimal(n) / 1000,
        )
        for n, (provider, model) in enumerate(MODELS)
    ]
    return PriceBook(entries)


def _per_call(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of `fn` (a closure running `calls` calls)."""
    began = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - began) / 1e9 / calls


def measure(tenants: int, fraction: float, seed: int, rounds: int) -> dict[str, Any]:
    rng = random.Random(seed)
    built = time.perf_counter()
    u = universe(tenants, fraction, seed)
    book = _book()
    ledger = SpendLedger()
    ledger.set_book(book)
    limits = [
        Limit(f"bud_{n:06d}", b.tenant, b.project, b.amount, b.hard, (Decimal("0.5"), Decimal(1)))
        for n, b in enumerate(u.budgets)
    ]
    ledger.set_limits(limits)
    period = period_of(datetime.now(UTC))
    entry_ids = [e.id for e in book.entries]
    usage: UsageMap = {}
    for limit in limits:
        by_price = usage.setdefault((limit.scope, period), {})
        for price_id in rng.sample(entry_ids, rng.randint(1, 3)):
            by_price[price_id] = [rng.randint(1, 10**7), 0, rng.randint(1, 10**5)]
    ledger.durable(1, usage)
    ledger.ready = True
    setup_s = time.perf_counter() - built
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

    def queries(pool: list[Any], k: int) -> list[tuple[str, str | None]]:
        out = []
        for account in rng.choices(pool, k=k):
            x = rng.random()
            project = None if x < 0.3 else rng.choice(account.projects)
            out.append((account.tenant, project))
        return out

    everyone = queries(u.accounts, 200_000)
    budgeted = queries(u.budgeted, len(u.budgeted))
    check = ledger.check
    dumps = json.dumps

    def run_checks(qs: list[tuple[str, str | None]]) -> Callable[[], None]:
        def go() -> None:
            for t, p in qs:
                check(t, p)

        return go

    def run_dumps(qs: list[tuple[str, str | None]]) -> Callable[[], None]:
        def go() -> None:
            for t, p in qs:
                dumps({"tenant_id": t, "project_id": p})

        return go

    # Every budgeted tenant once, in a fresh order per round; cold = right after a
    # `durable` that touched every scope (the spend cache is empty), warm = again.
    touch: UsageMap = {key: {entry_ids[0]: [1, 0, 0]} for key in usage}
    figures: dict[str, list[float]] = {
        k: [] for k in ("baseline", "all", "warm", "cold", "durable_touch_all")
    }
    for r in range(rounds):
        rng.shuffle(budgeted)
        figures["baseline"].append(_per_call(run_dumps(everyone), len(everyone)))
        figures["all"].append(_per_call(run_checks(everyone), len(everyone)))
        began = time.perf_counter_ns()
        ledger.durable(2 + r, touch)
        figures["durable_touch_all"].append((time.perf_counter_ns() - began) / 1e9)
        figures["cold"].append(_per_call(run_checks(budgeted), len(budgeted)))
        figures["warm"].append(_per_call(run_checks(budgeted), len(budgeted)))

    # The minute's reconciliation: finish_resync of every scope, and the longest time it
    # holds the ledger's lock (check waits for that: authorize runs on the event loop).
    resync_s: list[float] = []
    held_s: list[float] = []
    after_cut = dict(list(touch.items())[:1_000])
    held = _TimedLock()
    ledger._lock = held  # type: ignore[assignment]  # the same lock, timed
    for r in range(rounds):
        ledger.begin_resync(10_000 + r)
        ledger.durable(10_001 + r, after_cut)  # a batch after the cut, as under ingest
        exact = {k: {pk: list(q) for pk, q in v.items()} for k, v in usage.items()}
        held.longest = 0.0
        began = time.perf_counter_ns()
        ledger.finish_resync(exact)
        resync_s.append((time.perf_counter_ns() - began) / 1e9)
        held_s.append(held.longest)

    # prepare: loadgen batches, budgets on `fraction` of loadgen's tenants.
    lines = loadgen.build_lines(
        50_000, seed=LOADGEN_SEED, run_id="inproc", base_epoch=float(int(time.time()) - 900)
    )
    events = [msgspec.json.decode(line, type=Event) for line in lines]
    names = {a.tenant for a in u.budgeted}
    hit = sum(1 for e in events if e.tenant_id in names) / len(events)
    batches = [events[i : i + 1000] for i in range(0, len(events), 1000)]
    encoded = [loadgen.json_body(lines[i : i + 1000]) for i in range(0, len(lines), 1000)]
    decoder = msgspec.json.Decoder(dict[str, list[Event]])
    prep: dict[str, list[float]] = {"prepare": [], "decode": [], "durable": [], "baseline": []}
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        prepared = [ledger.prepare(batch) for batch in batches]
        t1 = time.perf_counter_ns()
        for n, p in enumerate(prepared):
            if p is not None:
                ledger.durable(100 + n, p)
        t2 = time.perf_counter_ns()
        for body in encoded:
            decoder.decode(body)
        t3 = time.perf_counter_ns()
        for e in events:
            dumps({"tenant_id": e.tenant_id, "project_id": e.project_id})
        t4 = time.perf_counter_ns()
        n_events = len(events)
        prep["prepare"].append((t1 - t0) / 1e9 / n_events)
        prep["durable"].append((t2 - t1) / 1e9 / n_events)
        prep["decode"].append((t3 - t2) / 1e9 / n_events)
        prep["baseline"].append((t4 - t3) / 1e9 / n_events)
    gc.unfreeze()
    return {
        "tenants": len(u.accounts),
        "budgeted_tenants": len(u.budgeted),
        "budgets": len(u.budgets),
        "hard": sum(1 for b in u.budgets if b.hard),
        "project_budgets": sum(1 for b in u.budgets if b.project is not None),
        "setup_s": setup_s,
        "check": {k: statistics.median(v) for k, v in figures.items()},
        "check_rounds": figures,
        "finish_resync_s": statistics.median(resync_s),
        "finish_resync_lock_s": max(held_s),
        "prepare": {k: statistics.median(v) for k, v in prep.items()},
        "prepare_events": len(events),
        "prepare_budgeted_share": hit,
        "rounds": rounds,
    }


def render(m: dict[str, Any]) -> list[str]:
    c, p = m["check"], m["prepare"]
    base = c["baseline"]

    def us(x: float) -> str:
        return f"{x * 1e6:.2f} µs"

    def verdict(x: float, limit: float) -> str:
        return "met" if x <= limit else "MISSED"

    rows = [
        f"Ledger: {m['tenants']:,} tenants, {m['budgeted_tenants']:,} budgeted "
        f"({m['budgets']:,} budgets: {m['project_budgets']:,} per project, {m['hard']:,} hard), "
        f"1-3 price entries per scope; built in {m['setup_s']:.1f} s; median of "
        f"{m['rounds']} rounds.",
        "",
        "| figure | per call | ratio to baseline | target | verdict |",
        "|---|---|---|---|---|",
        f"| baseline: `json.dumps` of a small dict | {us(base)} | 1.00 | - | - |",
        f"| `check`, tenants drawn from all (90% unbudgeted) | {us(c['all'])} | "
        f"{c['all'] / base:.2f} | ≤ 50 µs | {verdict(c['all'], 50e-6)} |",
        f"| `check`, budgeted tenants, spend cache warm | {us(c['warm'])} | "
        f"{c['warm'] / base:.2f} | ≤ 50 µs | {verdict(c['warm'], 50e-6)} |",
        f"| `check`, budgeted tenants, cache cold (after `durable`) | {us(c['cold'])} | "
        f"{c['cold'] / base:.2f} | ≤ 50 µs | {verdict(c['cold'], 50e-6)} |",
        f"| `durable` touching all {m['budgets']:,} scopes (the cold set-up, once) | "
        f"{c['durable_touch_all'] * 1e3:.1f} ms | - | - | - |",
        f"| `finish_resync` of all {m['budgets']:,} scopes (the minute's reconciliation, "
        "with a 1,000-scope batch after the cut; every scope drifted: the exact map differs "
        f"from the ledger's everywhere, the worst case), median | "
        f"{m['finish_resync_s'] * 1e3:.1f} ms "
        "| - | - | - |",
        f"| of which the ledger's lock held at once, longest of {m['rounds']} (a `check` "
        f"waits for it) | {m.get('finish_resync_lock_s', float('nan')) * 1e3:.2f} ms "
        "| - | - | - |",
        "",
        f"`prepare`, {m['prepare_events']:,} loadgen events in 1,000-event batches, "
        f"{m['prepare_budgeted_share']:.1%} of events from budgeted tenants:",
        "",
        "| per event | time | ratio to baseline |",
        "|---|---|---|",
        f"| baseline: `json.dumps` of a small dict | {us(p['baseline'])} | 1.00 |",
        f"| `prepare` | {us(p['prepare'])} | {p['prepare'] / p['baseline']:.2f} |",
        f"| `durable` of the prepared usage | {us(p['durable'])} | "
        f"{p['durable'] / p['baseline']:.2f} |",
        f"| for scale: msgspec decode of the body into `Event` | {us(p['decode'])} | "
        f"{p['decode'] / p['baseline']:.2f} |",
    ]
    return rows
