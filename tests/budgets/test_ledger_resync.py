"""The ledger's exact rebuild while batches keep arriving (no database, no ClickHouse).

`finish_resync` compares the exact map with a copy of the live one outside the lock and
puts in only the entries that differ; these tests admit batches at every stage of it."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.budgets import ledger as ledger_module
from billing.budgets.ledger import Limit, SpendLedger, UsageMap
from billing.rating import PriceBook, PriceEntry

NOW = datetime(2026, 5, 14, 12, tzinfo=UTC)
PERIOD = "2026-05"
ENTRY = PriceEntry(
    "pe1", "p", "m", datetime(2026, 1, 1, tzinfo=UTC), "USD", Decimal(1), Decimal(0), Decimal(0)
)
A = ("t1", None)
B = ("t2", None)


def usage(scope: tuple[str, None], tokens: int) -> UsageMap:
    return {(scope, PERIOD): {"pe1": [tokens, 0, 0]}}


def make_ledger() -> SpendLedger:
    ledger = SpendLedger(lambda: NOW)
    ledger.set_book(PriceBook([ENTRY]))
    ledger.set_limits(
        [Limit("b1", "t1", None, Decimal(100), True), Limit("b2", "t2", None, Decimal(100), True)]
    )
    return ledger


def spend(ledger: SpendLedger, scope: tuple[str, None]) -> Decimal:
    return ledger.spend(scope)[0]


def test_a_batch_admitted_while_the_exact_map_is_compared_counts_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger = make_ledger()
    ledger.begin_resync(0)
    ledger.finish_resync({**usage(A, 2_000_000), **usage(B, 1_000_000)})
    assert spend(ledger, A) == Decimal(2) and spend(ledger, B) == Decimal(1)

    # Up to the cut (seq 10) ClickHouse holds A: 3M tokens, B: 1M; the ledger has counted
    # A: 2M (a drift of 1 USD) and B: 1M. Batch 11 comes after the cut but before the
    # copy; batch 12 while the maps are compared (outside the lock).
    ledger.begin_resync(10)
    ledger.durable(11, usage(B, 500_000))
    assert spend(ledger, B) == Decimal("1.5")  # cached now: the swap must not keep it
    admitted: list[int] = []

    def pause_and_admit(count: int = -1, every: int = 128) -> None:
        if not admitted:
            admitted.append(12)
            ledger.durable(12, usage(A, 4_000_000))

    monkeypatch.setattr(ledger_module, "pause", pause_and_admit)
    drift = ledger.finish_resync({**usage(A, 3_000_000), **usage(B, 1_000_000)})
    assert admitted == [12]
    # Drift: the ledger's copy (taken with batch 11 only) minus exact plus batch 11.
    assert drift == {A: Decimal(-1), B: Decimal(0)}
    assert spend(ledger, A) == Decimal(7)  # 3M exact + 4M of batch 12
    assert spend(ledger, B) == Decimal("1.5")  # 1M exact + 0.5M of batch 11
    assert ledger.take_changed() >= {A}


def test_an_unchanged_scope_keeps_its_entry_and_cached_spend() -> None:
    ledger = make_ledger()
    ledger.begin_resync(0)
    ledger.finish_resync({**usage(A, 1_000_000), **usage(B, 1_000_000)})
    assert spend(ledger, A) == Decimal(1)
    ledger.take_changed()
    ledger.begin_resync(1)
    ledger.durable(2, usage(A, 1_000_000))  # after the cut: in the ledger and added on top
    drift = ledger.finish_resync({**usage(A, 1_000_000), **usage(B, 1_000_000)})
    assert drift == {A: Decimal(0), B: Decimal(0)}
    assert spend(ledger, A) == Decimal(2) and spend(ledger, B) == Decimal(1)
    assert ledger.take_changed() == {A}  # from the batch; no drift, so nothing else


def test_usage_gone_from_clickhouse_is_dropped_and_a_new_budget_meanwhile_is_kept() -> None:
    ledger = make_ledger()
    ledger.begin_resync(0)
    ledger.finish_resync({**usage(A, 1_000_000), **usage(B, 1_000_000)})
    ledger.begin_resync(5)
    # A budget on a third scope arrives during the rebuild (it gets its own resync later).
    assert ledger.put_limit(Limit("b3", "t3", None, Decimal(100), True))
    ledger.durable(6, usage(("t3", None), 1_000_000))
    ledger.finish_resync(usage(A, 1_000_000))  # B has nothing in ClickHouse
    assert spend(ledger, A) == Decimal(1)
    assert spend(ledger, B) == Decimal(0)
    assert spend(ledger, ("t3", None)) == Decimal(1)
