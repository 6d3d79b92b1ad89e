"""The pure builder: half-up cents per line, unpriced lines, late usage never billed twice."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from billing.invoices.builder import LineKey, build, late_quantities, line_amount
from billing.invoices.periods import BadPeriod, Period
from billing.rating import PriceBook, PriceEntry, Usage

T0 = datetime(2026, 9, 1, tzinfo=UTC)
T1 = datetime(2026, 9, 10, 10, 17, 3, 250000, tzinfo=UTC)


def entry(id_: str, at: datetime, input_: str) -> PriceEntry:
    return PriceEntry(id_, "p", "m", at, "USD", Decimal(input_), Decimal(0), Decimal("0.2"))


def test_each_line_rounds_half_up_to_the_cent_once() -> None:
    assert line_amount(1, Decimal("5000"), "doc_query_pairs") == Decimal("5.00")
    assert line_amount(25, Decimal("0.2"), "doc_query_pairs") == Decimal("0.01")  # 0.005 up
    assert line_amount(24, Decimal("0.2"), "doc_query_pairs") == Decimal("0.00")  # 0.0048
    assert line_amount(3, Decimal("0.005"), "input_tokens") == Decimal("0.00")
    # Rounded per line on the summed quantity, not per event: 3 x 0.004 = 0.012 -> 0.01.
    book = PriceBook([entry("a", T0, "0")])
    usages = [Usage("proj", "p", "m", T0, 0, 0, 20) for _ in range(3)]
    built = build(usages, book, "2026-09")
    assert [(ln.quantity, ln.amount) for ln in built.lines] == [(60, Decimal("0.01"))]


def test_a_price_change_splits_lines_and_unpriced_usage_is_flagged() -> None:
    book = PriceBook([entry("a", T0, "0.25"), entry("b", T1, "0.3125")])
    usages = [
        Usage("proj", "p", "m", T0, 1_000_000, 0, 0),
        Usage("proj", "p", "m", T1, 2_000_000, 0, 10),
        Usage("proj", "p", "other", T1, 5, 0, 0),
    ]
    built = build(usages, book, "2026-09")
    got = [(ln.key.model, ln.key.meter, ln.key.price_id, ln.amount) for ln in built.lines]
    assert got == [
        ("m", "input_tokens", "a", Decimal("0.25")),
        ("m", "input_tokens", "b", Decimal("0.63")),  # 0.625 half-up
        ("m", "doc_query_pairs", "b", Decimal("0.00")),
        ("other", "input_tokens", None, Decimal("0.00")),
    ]
    assert built.total == Decimal("0.88")
    assert built.unpriced == [("p", "other")] and "p/other" in (built.unpriced_reason() or "")


def test_late_usage_is_what_raw_exceeds_billed_and_never_negative() -> None:
    a, b = LineKey("x", "p", "m", "input_tokens", "a"), LineKey("x", "p", "m", "input_tokens", "b")
    prices = {"a": entry("a", T0, "1"), "b": entry("b", T1, "2")}
    assert late_quantities({a: 10}, {a: 7}, prices) == {a: 3}
    assert late_quantities({a: 10}, {a: 10}, prices) == {}
    assert late_quantities({a: 10}, {a: 12}, prices) == {}
    # A price entry posted after the month was billed re-splits usage already billed:
    # nothing is owed, so nothing is billed again.
    assert late_quantities({a: 4, b: 6}, {a: 10}, prices) == {}
    # With 2 more events after it, exactly 2 are owed, at the entry that covers them.
    assert late_quantities({a: 4, b: 8}, {a: 10}, prices) == {b: 2}


def test_periods() -> None:
    assert str(Period.parse("2026-12").next()) == "2027-01"
    assert str(Period.parse("2026-01").previous()) == "2025-12"
    assert str(Period.parse("2026-03").minus(14)) == "2025-01"
    for bad in ("2026-00", "2026-1", "1969-12", "x"):
        try:
            Period.parse(bad)
        except BadPeriod as exc:
            assert str(exc) == "period: must be YYYY-MM"
        else:
            raise AssertionError(bad)
