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
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, NamedTuple

from billing.rating import (
    METERS,
    UNIT_NAME,
    Meter,
    PriceBook,
    PriceEntry,
    Usage,
    meter_amount,
    unit_rate,
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
        return unpriced_reason(self.unpriced)


def unpriced_reason(unpriced: Sequence[tuple[str, str]]) -> str | None:
    """Why an invoice with unpriced usage (sorted (provider, model) pairs) is held."""
    if not unpriced:
        return None
    names = ", ".join(f"{p}/{m}" for p, m in unpriced)
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


# A month's close builds millions of lines: there, a line is a plain tuple in the invoice
# table's column order (project_id, provider, model, meter, price_id, quantity, unit price
# as text or None, amount as text, usage_period, late), and amounts are integer cents.
LineTuple = tuple[str, str, str, Meter, str | None, int, str | None, str, str, bool]
# A meter's price as integers: amount in cents = (quantity x m + h) // p, half-up (for a
# non-negative price), and the unit price as the invoice shows it; None: negative.
MeterRate = tuple[int, int, int, str] | None


class SpanPrice(NamedTuple):
    """The entry in force over a span of usage and its rates per meter (METERS order)."""

    entry: PriceEntry
    rates: tuple[MeterRate, MeterRate, MeterRate]


def meter_rate(unit_price: Decimal, meter: Meter) -> MeterRate:
    """`line_amount` as integer arithmetic: quantity x unit price / unit size is exactly
    quantity x mantissa x 10^exponent (`billing.rating.unit_rate`); in cents that is
    quantity x mantissa x 10^(exponent + 2), rounded half-up (floor of x + 1/2, for x >= 0)."""
    mantissa, exponent = unit_rate(unit_price, meter)
    if mantissa < 0:
        return None  # never posted (prices are non-negative); `line_amount` handles it
    shift = exponent + 2
    if shift >= 0:
        return mantissa * 10**shift, 0, 1, format(unit_price, "f")
    p = 10**-shift
    return mantissa, p // 2, p, format(unit_price, "f")


def cents_text(cents: int) -> str:
    """Integer cents as the decimal text of a line amount ("12.34", "0.05")."""
    if cents < 0:
        return "-" + cents_text(-cents)
    return f"{cents // 100}.{cents % 100:02d}"


def _rate_amount(quantity: int, rate: MeterRate, unit_price: Decimal, meter: Meter) -> int:
    if rate is None:
        return int(line_amount(quantity, unit_price, meter).scaleb(2))
    m, h, p, _ = rate
    return (quantity * m + h) // p


class SpanPrices(dict[tuple[str, str, Hashable], SpanPrice | None]):
    """(provider, model, span key) -> the entry in force at the span's start, with its
    rates (None: unpriced), looked up once per key (`PriceBook.price_at`). `when` turns
    a span key into the span's start."""

    def __init__(self, book: PriceBook, when: Callable[[Any], datetime]) -> None:
        super().__init__()
        self._book = book
        self._when = when
        self._by_entry: dict[str, SpanPrice] = {}

    def __missing__(self, key: tuple[str, str, Hashable]) -> SpanPrice | None:
        provider, model, span = key
        entry = self._book.price_at(provider, model, self._when(span))
        value = None if entry is None else self.of(entry)
        self[key] = value
        return value

    def of(self, entry: PriceEntry) -> SpanPrice:
        found = self._by_entry.get(entry.id)
        if found is None or found.entry is not entry:
            rates = tuple(meter_rate(entry.unit_price(m), m) for m in METERS)
            found = SpanPrice(entry, rates)  # type: ignore[arg-type]
            self._by_entry[entry.id] = found
        return found


class Drafted(NamedTuple):
    """An invoice's content as a month's close writes it: lines in order, total, and the
    (provider, model) pairs of its unpriced usage (sorted)."""

    lines: list[LineTuple]
    total: Decimal
    unpriced: list[tuple[str, str]]

    def unpriced_reason(self) -> str | None:
        return unpriced_reason(self.unpriced)


_ZERO = "0.00"


def own_lines(
    rows: Sequence[Sequence[Any]], prices: SpanPrices, period: str
) -> tuple[list[LineTuple], int, set[tuple[str, str]]]:
    """One tenant's lines of its own month, from usage rows (_, project, provider, model,
    span key, input tokens, output tokens, pairs) sorted by (project, provider, model,
    span start): the lines come out in `assemble`'s order (project, provider, model,
    meter, entry's effective_from). Spans are cut only where the (provider, model)'s
    price changes, so a row is one price entry; rows that share one are summed. Returns
    the lines, their total in cents and the unpriced (provider, model) pairs."""
    out: list[LineTuple] = []
    append = out.append
    total = 0
    unpriced: set[tuple[str, str]] = set()
    n = len(rows)
    i = 0
    while i < n:
        row = rows[i]
        _, project, provider, model, span, q0, q1, q2 = row
        j = i + 1
        while j < n and rows[j][1] == project and rows[j][2] == provider and rows[j][3] == model:
            j += 1
        if j == i + 1:  # one price entry for this (project, provider, model): the usual case
            price = prices[(provider, model, span)]
            if price is None:
                if q0 > 0 or q1 > 0 or q2 > 0:
                    unpriced.add((provider, model))
                if q0 > 0:
                    append((project, provider, model, "input_tokens", None, q0, None, _ZERO,
                            period, False))  # fmt: skip
                if q1 > 0:
                    append((project, provider, model, "output_tokens", None, q1, None, _ZERO,
                            period, False))  # fmt: skip
                if q2 > 0:
                    append((project, provider, model, "doc_query_pairs", None, q2, None, _ZERO,
                            period, False))  # fmt: skip
            else:
                entry = price.entry
                pid = entry.id
                r0, r1, r2 = price.rates
                if q0 > 0:
                    if r0 is None:
                        c = _rate_amount(q0, r0, entry.input_per_1m_tokens, "input_tokens")
                        ut = format(entry.input_per_1m_tokens, "f")
                    else:
                        m, h, p, ut = r0
                        c = (q0 * m + h) // p
                    total += c
                    append((project, provider, model, "input_tokens", pid, q0, ut,
                            f"{c // 100}.{c % 100:02d}" if c >= 0 else cents_text(c),
                            period, False))  # fmt: skip
                if q1 > 0:
                    if r1 is None:
                        c = _rate_amount(q1, r1, entry.output_per_1m_tokens, "output_tokens")
                        ut = format(entry.output_per_1m_tokens, "f")
                    else:
                        m, h, p, ut = r1
                        c = (q1 * m + h) // p
                    total += c
                    append((project, provider, model, "output_tokens", pid, q1, ut,
                            f"{c // 100}.{c % 100:02d}" if c >= 0 else cents_text(c),
                            period, False))  # fmt: skip
                if q2 > 0:
                    if r2 is None:
                        c = _rate_amount(q2, r2, entry.per_1k_doc_query_pairs, "doc_query_pairs")
                        ut = format(entry.per_1k_doc_query_pairs, "f")
                    else:
                        m, h, p, ut = r2
                        c = (q2 * m + h) // p
                    total += c
                    append((project, provider, model, "doc_query_pairs", pid, q2, ut,
                            f"{c // 100}.{c % 100:02d}" if c >= 0 else cents_text(c),
                            period, False))  # fmt: skip
        else:
            total += _group_lines(rows[i:j], prices, period, append, unpriced)
        i = j
    return out, total, unpriced


def _group_lines(
    rows: Sequence[Sequence[Any]],
    prices: SpanPrices,
    period: str,
    append: Callable[[LineTuple], None],
    unpriced: set[tuple[str, str]],
) -> int:
    """Several spans of one (project, provider, model): summed per price entry, then one
    line per (meter, entry), entries by effective_from (unpriced first, as `assemble`)."""
    _, project, provider, model = rows[0][:4]
    sums: dict[str | None, list[int]] = {}
    found: dict[str | None, SpanPrice | None] = {}
    for row in rows:
        price = prices[(provider, model, row[4])]
        pid = None if price is None else price.entry.id
        found[pid] = price
        acc = sums.setdefault(pid, [0, 0, 0])
        acc[0] += row[5]
        acc[1] += row[6]
        acc[2] += row[7]

    def start(pid: str | None) -> datetime:
        price = found[pid]
        return _EARLIEST if price is None else price.entry.effective_from

    order = sorted(sums, key=start)
    total = 0
    for k, meter in enumerate(METERS):
        for pid in order:
            q = sums[pid][k]
            if q <= 0:
                continue
            price = found[pid]
            if price is None:
                unpriced.add((provider, model))
                append((project, provider, model, meter, None, q, None, _ZERO, period, False))
                continue
            unit_price = price.entry.unit_price(meter)
            c = _rate_amount(q, price.rates[k], unit_price, meter)
            total += c
            append((project, provider, model, meter, pid, q, format(unit_price, "f"),
                    cents_text(c), period, False))  # fmt: skip
    return total


def line_tuples(lines: Iterable[Line]) -> list[LineTuple]:
    """`Line`s (late lines, built by `make_lines`) as the close writes them."""
    return [
        (
            ln.key.project_id,
            ln.key.provider,
            ln.key.model,
            ln.key.meter,
            ln.key.price_id,
            ln.quantity,
            None if ln.unit_price is None else format(ln.unit_price, "f"),
            format(ln.amount, "f"),
            ln.usage_period,
            ln.late,
        )
        for ln in lines
    ]


def draft(
    rows: Sequence[Sequence[Any]],
    prices: SpanPrices,
    period: str,
    late: Mapping[str, tuple[Mapping[LineKey, int], Mapping[LineKey, int]]] | None = None,
    entries: Mapping[str, PriceEntry] | None = None,
) -> Drafted:
    """An invoice of `period` as the close writes it: `own_lines` of its usage rows, then
    late lines (as `build`), total = sum of the lines' cents."""
    lines, cents, unpriced = own_lines(rows, prices, period)
    if late:
        assert entries is not None
        extra: list[Line] = []
        for month, (raw, billed) in sorted(late.items()):
            extra += make_lines(late_quantities(raw, billed, entries), entries, month, late=True)
        late_built = assemble(extra, entries)
        lines += line_tuples(late_built.lines)
        cents += int(late_built.total.scaleb(2))
        unpriced |= {(ln.key.provider, ln.key.model) for ln in late_built.lines if ln.unpriced}
    return Drafted(lines, Decimal(cents_text(cents)), sorted(unpriced))
