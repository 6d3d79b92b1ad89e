"""Rating: exact decimal cost per the contract's formula, the price in force at a span's
start, unpriced usage never priced at zero."""

from __future__ import annotations

import decimal
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billing.rating import (
    EXACT,
    PriceBook,
    PriceEntry,
    Usage,
    event_cost,
    meter_amount,
    money,
    rate,
    total,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def entry(
    at: datetime, input_: str, output: str = "0", pairs: str = "0", model: str = "m"
) -> PriceEntry:
    return PriceEntry(
        f"p-{at.isoformat()}",
        "cohere",
        model,
        at,
        "USD",
        Decimal(input_),
        Decimal(output),
        Decimal(pairs),
    )


def test_cost_is_the_contract_formula_exactly() -> None:
    price = entry(T0, "0.25", "1.5", "0.20")
    # 1234 x 0.25 / 10^6 + 7 x 1.5 / 10^6 + 3 x 50 x 0.20 / 10^3
    assert event_cost(price, 1234, 7, 150) == Decimal("0.0003085") + Decimal("0.0000105") + Decimal(
        "0.03"
    )
    assert money(event_cost(price, 1, 0, 0)) == "0.00000025"
    # Sums far beyond float precision stay exact.
    huge = 18_446_744_073_709_551_615
    assert meter_amount(huge, Decimal("0.000000000001"), "input_tokens") == Decimal(
        "18.446744073709551615"
    )


def test_linearity_rating_sums_equals_summing_ratings() -> None:
    price = entry(T0, "0.33", "0.07", "0.013")
    events = [(i * 37 % 1000, i % 5, i * 3) for i in range(1, 500)]
    each = sum((event_cost(price, *e) for e in events), Decimal(0))
    summed = event_cost(price, *(sum(x) for x in zip(*events, strict=True)))
    assert each == summed


def test_the_price_in_force_at_the_span_start_applies() -> None:
    change = T0 + timedelta(hours=5, minutes=17, milliseconds=250)
    book = PriceBook([entry(T0, "0.25"), entry(change, "0.30")])
    assert book.price_at(
        "cohere", "m", change - timedelta(milliseconds=1)
    ).input_per_1m_tokens == Decimal("0.25")  # type: ignore[union-attr]
    assert book.price_at("cohere", "m", change).input_per_1m_tokens == Decimal("0.30")  # type: ignore[union-attr]
    assert book.price_at("cohere", "m", T0 - timedelta(seconds=1)) is None
    assert book.boundaries(T0, T0 + timedelta(days=1)) == [change]
    assert book.boundaries(change, T0 + timedelta(days=1)) == []  # open interval


def test_unpriced_usage_is_listed_never_zero() -> None:
    book = PriceBook([entry(T0, "0.25")])
    usages = [
        Usage("a", "cohere", "m", T0, 1_000_000, 0, 0),
        Usage("b", "cohere", "other-model", T0, 500, 0, 0),
        Usage("c", "cohere", "m", T0 - timedelta(days=1), 10, 0, 0),  # before the first entry
    ]
    rated = list(rate(usages, book))
    assert [r.cost for r in rated] == [Decimal("0.25"), None, None]
    totals = total(rated)
    assert totals.cost == Decimal("0.25")
    assert totals.unpriced == {("cohere", "other-model"), ("cohere", "m")}
    assert totals.unpriced_input_tokens == 510


def test_money_is_plain_digits() -> None:
    assert money(Decimal("1E-7")) == "0.0000001"
    assert money(Decimal("1.2300")) == "1.23"
    assert money(Decimal("100")) == "100"
    assert money(Decimal(0)) == "0"


def test_an_inexact_operation_raises_instead_of_rounding() -> None:
    with pytest.raises(decimal.Inexact):
        EXACT.divide(Decimal(1), Decimal(3))
