"""The pure builder: half-up cents per line, unpriced lines, late usage never billed twice;
the close's integer-cent lines equal `build`'s."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal

from billing.invoices.builder import (
    LineKey,
    SpanPrices,
    _rate_amount,
    build,
    cents_text,
    draft,
    late_quantities,
    line_amount,
    line_tuples,
    meter_rate,
)
from billing.invoices.periods import BadPeriod, Period
from billing.rating import METERS, PriceBook, PriceEntry, Usage

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


def test_integer_cents_equal_the_decimal_line_amount() -> None:
    """The close prices lines in integer cents (`meter_rate`); `line_amount` is the exact
    Decimal reference (billing.rating, then half-up): they agree everywhere, ties too."""
    rng = random.Random(11)
    prices = ["0", "0.2", "0.005", "0.25", "0.3125", "0.1234567", "5000", "1E+2", "7.5"]
    prices += ["0.000000000001", "123.456789012345", "0.0007", "0.14"]
    for text in prices:
        price = Decimal(text)
        for meter in METERS:
            rate = meter_rate(price, meter)
            quantities = [
                0,
                1,
                5,
                24,
                25,
                50,
                125,
                999,
                1000,
                5_000_000,
                18_446_744_073_709_551_615,
            ]
            quantities += [10**k * m for k in range(12) for m in (1, 5, 15, 25)]
            quantities += [rng.randint(0, 10**15) for _ in range(200)]
            for q in quantities:
                want = format(line_amount(q, price, meter), "f")
                assert cents_text(_rate_amount(q, rate, price, meter)) == want, (text, meter, q)


def _rows_and_usages(
    rng: random.Random, book: PriceBook, start: datetime, end: datetime
) -> tuple[list[tuple[object, ...]], list[Usage[str]]]:
    """Random usage as the close reads it (sorted rows, spans cut per (provider, model))
    and the same usage as `Usage` spans for `build`."""
    cuts = book.boundaries_by_model(start, end)
    rows: list[tuple[object, ...]] = []
    for project in ("a", "b", "c\tx"):
        for provider, model in (("p", "m"), ("p", "n"), ("q", "m"), ("p", "zz-unpriced")):
            spans = [start, *cuts.get((provider, model), [])]
            for span in sorted(rng.sample(spans, rng.randint(0, len(spans)))):
                qs = [rng.choice([0, rng.randint(1, 10**7)]) for _ in range(3)]
                rows.append(("t", project, provider, model, span, *qs))
    rows.sort(key=lambda r: r[1:5])  # as ClickHouse sorts them
    usages = [Usage(str(r[1]), str(r[2]), str(r[3]), r[4], *r[5:]) for r in rows]  # type: ignore[arg-type]
    return rows, usages


def test_the_close_builds_the_same_lines_as_build() -> None:
    """`draft` (the close: rows in order, integer cents) equals `build` (the preview's and
    the late lines' way: quantities per line key, Decimal, sorted) line for line, across
    price changes inside the month, unpriced usage, zero quantities and late usage."""
    start, end = datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC)
    mid, later = T1, datetime(2026, 9, 20, 0, 0, 30, tzinfo=UTC)
    entries = [
        PriceEntry(
            "pm0", "p", "m", T0.replace(month=1), "USD", *map(Decimal, ("0.25", "1.5", "0.2"))
        ),
        PriceEntry("pm1", "p", "m", mid, "USD", *map(Decimal, ("0.3125", "0", "0.0007"))),
        PriceEntry("pm2", "p", "m", later, "USD", *map(Decimal, ("0.1", "0.005", "0.1234567"))),
        PriceEntry("pn0", "p", "n", T0.replace(month=1), "USD", *map(Decimal, ("5", "7", "0.5"))),
        PriceEntry("qm1", "q", "m", mid, "USD", *map(Decimal, ("0.3", "0", "0.16"))),
    ]
    book = PriceBook(entries)
    by_id = {e.id: e for e in entries}
    rng = random.Random(5)
    for _ in range(60):
        rows, usages = _rows_and_usages(rng, book, start, end)
        late = None
        if rng.random() < 0.5:
            key = LineKey("a", "p", "m", "input_tokens", "pm1")
            late = {"2026-08": ({key: rng.randint(1, 10**8)}, {key: rng.randint(0, 10**6)})}
        want = build(usages, book, "2026-09", late)
        got = draft(rows, SpanPrices(book, lambda t: t), "2026-09", late, by_id)
        assert got.lines == line_tuples(want.lines)
        assert got.total == want.total
        assert got.unpriced == want.unpriced and got.unpriced_reason() == want.unpriced_reason()
