"""Rating: usage aggregates and a price book in, priced amounts out. Pure functions.

Every figure that carries money (stats, usage, budgets, invoices) is computed here, so
that none can disagree with another. The contract's cost of a billable event is

    input_tokens x input_per_1m_tokens / 10^6
  + output_tokens x output_per_1m_tokens / 10^6
  + queries x documents x per_1k_doc_query_pairs / 10^3

and because it is linear, the cost of a sum of events priced by one entry is the same
formula over their sums: usage is aggregated first (in ClickHouse) and rated here, per
span of time in which one price entry applies. Arithmetic is exact: a decimal context
wide enough for any sum we can hold, with `Inexact` trapped, so a rounding would raise
instead of passing silently. Nothing here rounds; only invoice lines round, to the cent.

The price of a span is the entry of its (provider, model) with the latest
`effective_from` <= the span's start; the caller makes spans that never cross an
entry's `effective_from` (`PriceBook.boundaries`). Usage without an entry is unpriced:
its cost is None, never zero.
"""

from __future__ import annotations

import bisect
import decimal
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Generic, Literal, TypeVar

Meter = Literal["input_tokens", "output_tokens", "doc_query_pairs"]
METERS: tuple[Meter, ...] = ("input_tokens", "output_tokens", "doc_query_pairs")
# Units of each meter's price: per 1M tokens, per 1K pairs.
UNIT_SIZE: dict[Meter, int] = {
    "input_tokens": 1_000_000,
    "output_tokens": 1_000_000,
    "doc_query_pairs": 1_000,
}
UNIT_EXPONENT: dict[Meter, int] = {"input_tokens": 6, "output_tokens": 6, "doc_query_pairs": 3}
UNIT_NAME: dict[Meter, str] = {
    "input_tokens": "1M tokens",
    "output_tokens": "1M tokens",
    "doc_query_pairs": "1K pairs",
}

# 80 significant digits: a price of 12 digits times a count of 20 digits, summed over
# billions of spans, stays far inside it. Inexact is trapped: exactness is checked.
EXACT = decimal.Context(
    prec=80, traps=[decimal.Inexact, decimal.Overflow, decimal.InvalidOperation]
)

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One entry of the price book: the prices of a (provider, model) from a moment on."""

    id: str
    provider: str
    model: str
    effective_from: datetime
    currency: str
    input_per_1m_tokens: Decimal
    output_per_1m_tokens: Decimal
    per_1k_doc_query_pairs: Decimal

    def unit_price(self, meter: Meter) -> Decimal:
        if meter == "input_tokens":
            return self.input_per_1m_tokens
        if meter == "output_tokens":
            return self.output_per_1m_tokens
        return self.per_1k_doc_query_pairs


@dataclass(frozen=True, slots=True)
class Usage(Generic[K]):
    """Billable usage of one (provider, model) in a span that one price entry covers.

    `key` is the caller's grouping (a bucket, a tenant, a project ...), carried through.
    """

    key: K
    provider: str
    model: str
    start: datetime
    input_tokens: int
    output_tokens: int
    doc_query_pairs: int

    def quantity(self, meter: Meter) -> int:
        if meter == "input_tokens":
            return self.input_tokens
        if meter == "output_tokens":
            return self.output_tokens
        return self.doc_query_pairs


@dataclass(frozen=True, slots=True)
class Rated(Generic[K]):
    """`usage` priced by `price` (None: no entry covers it, so it is unpriced)."""

    usage: Usage[K]
    price: PriceEntry | None
    amounts: dict[Meter, Decimal] = field(default_factory=dict)

    @property
    def cost(self) -> Decimal | None:
        if self.price is None:
            return None
        return sum_exact(self.amounts.values())


def sum_exact(values: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for value in values:
        total = EXACT.add(total, value)
    return total


def meter_amount(quantity: int, unit_price: Decimal, meter: Meter) -> Decimal:
    """quantity x unit price / unit size, exactly."""
    return EXACT.multiply(Decimal(quantity), unit_price).scaleb(-UNIT_EXPONENT[meter], EXACT)


def unit_rate(unit_price: Decimal, meter: Meter) -> tuple[int, int]:
    """`meter_amount` as integers: the amount of a quantity q is exactly
    q x mantissa x 10^exponent, for the returned (mantissa, exponent). For callers that
    price millions of quantities at a few prices (a month's invoice lines)."""
    sign, digits, exponent = unit_price.as_tuple()
    if not isinstance(exponent, int):
        raise decimal.InvalidOperation(f"unit price {unit_price} is not a finite number")
    mantissa = int("".join(map(str, digits))) if digits else 0
    return (-mantissa if sign else mantissa), exponent - UNIT_EXPONENT[meter]


def event_cost(
    price: PriceEntry, input_tokens: int, output_tokens: int, doc_query_pairs: int
) -> Decimal:
    """The contract's cost formula for one event (or a sum of events), exactly."""
    return sum_exact(
        meter_amount(q, price.unit_price(m), m)
        for q, m in zip((input_tokens, output_tokens, doc_query_pairs), METERS, strict=True)
    )


class PriceBook:
    """Price entries by (provider, model), ordered by `effective_from`."""

    def __init__(self, entries: Iterable[PriceEntry]) -> None:
        self._by_key: dict[tuple[str, str], list[PriceEntry]] = {}
        for entry in sorted(entries, key=lambda e: (e.provider, e.model, e.effective_from)):
            self._by_key.setdefault((entry.provider, entry.model), []).append(entry)
        self._starts = {k: [e.effective_from for e in v] for k, v in self._by_key.items()}

    @property
    def entries(self) -> list[PriceEntry]:
        return [e for entries in self._by_key.values() for e in entries]

    def price_at(self, provider: str, model: str, at: datetime) -> PriceEntry | None:
        """The entry with the latest effective_from <= `at`, or None (unpriced)."""
        starts = self._starts.get((provider, model))
        if not starts:
            return None
        i = bisect.bisect_right(starts, at)
        return self._by_key[(provider, model)][i - 1] if i else None

    def current(self, provider: str, model: str, at: datetime) -> PriceEntry | None:
        return self.price_at(provider, model, at)

    def for_provider(self, provider: str, at: datetime) -> list[PriceEntry]:
        """The entries in force at `at` for every model of `provider`."""
        found = (self.price_at(p, m, at) for (p, m) in self._by_key if p == provider)
        return sorted((e for e in found if e is not None), key=lambda e: e.model)

    def boundaries_by_model(
        self, start: datetime, end: datetime
    ) -> dict[tuple[str, str], list[datetime]]:
        """Per (provider, model): the instants in (start, end) where one of its entries
        takes effect, ascending. Spans of one (provider, model)'s usage cut there (and
        nowhere else) each have one price: the entry in force at the span's start."""
        out = {}
        for key, starts in self._starts.items():
            inside = sorted({t for t in starts if start < t < end})
            if inside:
                out[key] = inside
        return out

    def boundaries(self, start: datetime, end: datetime) -> list[datetime]:
        """Every instant in (start, end) where some entry takes effect: spans of usage
        must be cut there so that each span has one price."""
        found = {t for starts in self._starts.values() for t in starts if start < t < end}
        return sorted(found)


def rate(usages: Iterable[Usage[K]], book: PriceBook) -> Iterator[Rated[K]]:
    """Price each usage span with the entry in force at its start."""
    for usage in usages:
        price = book.price_at(usage.provider, usage.model, usage.start)
        if price is None:
            yield Rated(usage, None)
            continue
        amounts = {
            meter: meter_amount(usage.quantity(meter), price.unit_price(meter), meter)
            for meter in METERS
        }
        yield Rated(usage, price, amounts)


@dataclass
class Totals:
    """A running total of rated usage: exact cost, plus what could not be priced."""

    cost: Decimal = Decimal(0)
    unpriced_input_tokens: int = 0
    unpriced_output_tokens: int = 0
    unpriced_doc_query_pairs: int = 0
    unpriced: set[tuple[str, str]] = field(default_factory=set)

    def add(self, rated: Rated[K]) -> None:
        cost = rated.cost
        if cost is None:
            u = rated.usage
            self.unpriced_input_tokens += u.input_tokens
            self.unpriced_output_tokens += u.output_tokens
            self.unpriced_doc_query_pairs += u.doc_query_pairs
            if u.input_tokens or u.output_tokens or u.doc_query_pairs:
                self.unpriced.add((u.provider, u.model))
        else:
            self.cost = EXACT.add(self.cost, cost)

    @property
    def has_unpriced(self) -> bool:
        return bool(self.unpriced)


def total(rated: Sequence[Rated[K]] | Iterable[Rated[K]]) -> Totals:
    totals = Totals()
    for r in rated:
        totals.add(r)
    return totals


def money(value: Decimal) -> str:
    """An exact decimal as the API writes money: plain digits, never an exponent."""
    if value == 0:
        return "0"
    return format(value.normalize(EXACT), "f")
