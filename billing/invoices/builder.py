"""Invoice lines and totals: rated usage and what was already billed in, lines out. Pure.

A line is one (project, provider, model, meter, price entry) of one usage period with a
non-zero quantity. Its amount is quantity / unit size x unit price, computed exactly by
`billing.rating` and then rounded half-up to the cent, once, on the line; the total is the
sum of the lines. Usage that no price entry covers becomes an *unpriced* line (unit price
None, amount 0, flagged): shown, never priced at zero silently; the service refuses to
finalize an invoice that has one (`unpriced_reason`).

Late usage: for a month already closed, what is owed is (the raw totals of the month now)
minus (the quantities already billed for it), per (project, provider, model, meter). The
difference goes on the next invoice as late lines with their own `usage_period`. It is
allocated to price entries by each entry's own shortfall, the latest entry first, so a
price entry posted after a month was billed (which re-splits usage already billed) never
bills any of it twice; a negative difference is never turned into a line.
"""

from __future__ import annotations

import decimal
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import NamedTuple

from billing.rating import (
    METERS,
    UNIT_NAME,
    Meter,
    PriceBook,
    PriceEntry,
    Usage,
    meter_amount,
)

CENT = Decimal("0.01")
# Rounding happens here and only here: one context that may round (half-up), wide enough.
_ROUND = decimal.Context(prec=80, rounding=ROUND_HALF_UP)
# Sums of cents: exact, with every rounding trapped (as billing.rating.EXACT).
_SUM = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.Overflow])
_EARLIEST = datetime(1, 1, 1, tzinfo=UTC)


class LineKey(NamedTuple):
    """A line's identity (a tuple: a month's close makes millions of them)."""

    project_id: str
    provider: str
    model: str
    meter: Meter
    price_id: str | None  # None: no price entry covers the usage (unpriced)


@dataclass(frozen=True, slots=True)
class Line:
    key: LineKey
    quantity: int
    unit_price: Decimal | None
    amount: Decimal
    usage_period: str
    late: bool = False

    @property
    def unit(self) -> str:
        return UNIT_NAME[self.key.meter]

    @property
    def unpriced(self) -> bool:
        return self.unit_price is None


@dataclass(frozen=True)
class Built:
    """An invoice's content: sorted lines and totals."""

    lines: list[Line]
    subtotal: Decimal
    total: Decimal

    @property
    def unpriced(self) -> list[tuple[str, str]]:
        return sorted({(ln.key.provider, ln.key.model) for ln in self.lines if ln.unpriced})

    def unpriced_reason(self) -> str | None:
        if not self.unpriced:
            return None
        names = ", ".join(f"{p}/{m}" for p, m in self.unpriced)
        return (
            f"lines: unpriced usage ({names}); post a price entry effective at or before the"
            " usage, then run the month again"
        )


def line_amount(quantity: int, unit_price: Decimal, meter: Meter) -> Decimal:
    """quantity / unit size x unit price (exact, by `billing.rating`), half-up to the cent."""
    return meter_amount(quantity, unit_price, meter).quantize(CENT, context=_ROUND)


def quantities(usages: Iterable[Usage[str]], book: PriceBook) -> dict[LineKey, int]:
    """Quantities per line key; each usage's key is its project_id, and its price entry is
    the one in force at its span's start (`PriceBook.price_at`, as `rate` looks it up;
    spans never cross an entry's start). Amounts are computed once per line, later."""
    out: dict[LineKey, int] = defaultdict(int)
    for u in usages:
        price = book.price_at(u.provider, u.model, u.start)
        price_id = price.id if price is not None else None
        if u.input_tokens:
            out[LineKey(u.key, u.provider, u.model, "input_tokens", price_id)] += u.input_tokens
        if u.output_tokens:
            out[LineKey(u.key, u.provider, u.model, "output_tokens", price_id)] += u.output_tokens
        if u.doc_query_pairs:
            key = LineKey(u.key, u.provider, u.model, "doc_query_pairs", price_id)
            out[key] += u.doc_query_pairs
    return dict(out)


def make_lines(
    amounts: Mapping[LineKey, int],
    prices: Mapping[str, PriceEntry],
    usage_period: str,
    *,
    late: bool = False,
) -> list[Line]:
    lines = []
    zero = Decimal("0.00")
    for key, quantity in amounts.items():
        if quantity <= 0:
            continue
        price_id, meter = key.price_id, key.meter
        if price_id is None:
            lines.append(Line(key, quantity, None, zero, usage_period, late))
            continue
        unit_price = prices[price_id].unit_price(meter)
        amount = line_amount(quantity, unit_price, meter)
        lines.append(Line(key, quantity, unit_price, amount, usage_period, late))
    return lines


def late_quantities(
    raw: Mapping[LineKey, int],
    billed: Mapping[LineKey, int],
    prices: Mapping[str, PriceEntry],
) -> dict[LineKey, int]:
    """What is still owed for a closed month, per line key (see the module docstring)."""
    groups: dict[tuple[str, str, str, str], list[LineKey]] = defaultdict(list)
    for key in set(raw) | set(billed):
        groups[(key.project_id, key.provider, key.model, key.meter)].append(key)
    out: dict[LineKey, int] = {}
    for keys in groups.values():
        owed = sum(raw.get(k, 0) for k in keys) - sum(billed.get(k, 0) for k in keys)
        if owed <= 0:
            continue

        def start(k: LineKey) -> datetime:
            entry = prices.get(k.price_id) if k.price_id is not None else None
            return entry.effective_from if entry is not None else _EARLIEST

        for key in sorted(keys, key=start, reverse=True):
            short = raw.get(key, 0) - billed.get(key, 0)
            if short <= 0:
                continue
            take = min(short, owed)
            out[key] = take
            owed -= take
            if not owed:
                break
    return out


_METER_ORDER = {m: i for i, m in enumerate(METERS)}


def assemble(lines: Iterable[Line], prices: Mapping[str, PriceEntry]) -> Built:
    """Sort the lines (the period's own first, then late ones by month) and total them."""

    def order(ln: Line) -> tuple[object, ...]:
        k = ln.key
        entry = prices.get(k.price_id) if k.price_id is not None else None
        when = entry.effective_from if entry is not None else _EARLIEST
        return (
            ln.late,
            ln.usage_period,
            k.project_id,
            k.provider,
            k.model,
            _METER_ORDER[k.meter],
            when,
        )

    ordered = sorted(lines, key=order)
    with decimal.localcontext(_SUM):  # exact: a rounding would raise (Inexact trapped)
        subtotal = sum((ln.amount for ln in ordered), CENT * 0)
    subtotal = subtotal.quantize(CENT, context=_ROUND)  # a sum of cents: exact
    return Built(ordered, subtotal, subtotal)


def build(
    usages: Iterable[Usage[str]],
    book: PriceBook,
    period: str,
    late: Mapping[str, tuple[Mapping[LineKey, int], Mapping[LineKey, int]]] | None = None,
    prices: Mapping[str, PriceEntry] | None = None,
) -> Built:
    """An invoice of `period`: its own usage (keys = project ids), plus, per closed month,
    (raw, billed) quantities whose difference becomes late lines. `prices` is the book's
    entries by id (made here when not given; a month's close passes it once)."""
    if prices is None:
        prices = {e.id: e for e in book.entries}
    lines = make_lines(quantities(usages, book), prices, period)
    for month, (raw, billed) in sorted((late or {}).items()):
        lines += make_lines(late_quantities(raw, billed, prices), prices, month, late=True)
    return assemble(lines, prices)
