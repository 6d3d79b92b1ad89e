"""The month's close, re-runs, late usage and the preview: orchestration of ClickHouse
usage (metering.invoices.usage), the pure builder (billing.invoices.builder) and the
invoice tables (billing.invoices.repository).

`run_period` takes the invoice-run lock first (one row of `invoice_counters`), so runs of
the API, the CLI, the scheduler and other replicas never interleave: the second waits,
then finds the work done. Within the lock:

- a month not yet closed is read whole; each tenant's draft is created or rebuilt (its own
  usage + late lines); drafts that no longer have a line are removed;
- with `finalize`, each draft becomes final with the next number (tenant order), unless
  it has unpriced usage: then it stays a draft with `held_reason`, and a later run
  finalizes it once a price covers the usage; the month is marked closed;
- a month already closed is not read again: only its held drafts are rebuilt (and
  finalized). Events of a closed month that arrive later are late usage: they go on each
  tenant's next invoice that is built (`late_usage`), never on the closed month's.

Services never commit: the caller's transaction (request or CLI command) does, and the
lock is held until then. Time is passed in (`now`), so tests drive the clock; the instant
the close started reading is wall-clock time (`read_at`), because it is compared with the
time ClickHouse stored each event.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from itertools import groupby
from operator import itemgetter
from typing import Any

from clickhouse_connect.driver.client import Client
from sqlalchemy.orm import Session

from billing.budgets.forecast import month_end_forecast
from billing.invoices import repository as repo
from billing.invoices.builder import CENT, Built, LineKey, SpanPrices, build, draft, quantities
from billing.invoices.periods import Period
from billing.rating import PriceBook, Usage
from metering.invoices import usage as ch_usage

LOOKBACK_MONTHS = 14  # events are accepted up to 400 days old
# Events stored this long before a close started reading may still have been missed by it
# (a part committed after the read began); they are checked for late usage too.
READ_MARGIN = timedelta(minutes=10)

LateInput = dict[str, tuple[dict[LineKey, int], dict[LineKey, int]]]


class PeriodNotEnded(ValueError):
    """The month has not ended yet (409)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class RunResult:
    period: str
    finalize: bool
    status: str = "draft"
    created: int = 0
    refreshed: int = 0
    finalized: int = 0
    unchanged: int = 0
    removed: int = 0
    held: list[dict[str, str]] = field(default_factory=list)
    total: Decimal = Decimal("0.00")

    def out(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "finalize": self.finalize,
            "status": self.status,
            "created": self.created,
            "refreshed": self.refreshed,
            "finalized": self.finalized,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "held": self.held,
            "total_usd": format(self.total, "f"),
        }


def late_usage(
    session: Session,
    ch: Client,
    book: PriceBook,
    period: Period,
    restrict: Collection[str] | None = None,
) -> dict[str, LateInput]:
    """Per tenant and closed month before `period`: (raw quantities now, quantities
    already billed), for the tenants that have events of that month stored since its
    close started reading (others cannot owe anything)."""
    out: dict[str, LateInput] = {}
    closed = repo.closed_periods(session, str(period.minus(LOOKBACK_MONTHS)), str(period))
    for row in closed:
        month = Period.parse(row.period)
        since = (row.read_at or row.finalized_at or month.end) - READ_MARGIN
        candidates = ch_usage.late_candidates(ch, month.start, month.end, since)
        if restrict is not None:
            candidates &= set(restrict)
        candidates -= repo.draft_tenants(session, row.period)  # held: still its own month's
        if not candidates:
            continue
        raw = ch_usage.usage(ch, book, month.start, month.end, candidates)
        billed = repo.billed(session, candidates, row.period)
        for tenant in candidates:
            out.setdefault(tenant, {})[row.period] = (
                quantities(raw.get(tenant, []), book),
                billed.get(tenant, {}),
            )
    return out


def run_period(
    session: Session,
    ch: Client,
    book: PriceBook,
    period: Period,
    *,
    finalize: bool,
    now: datetime,
    stripe: bool = False,
    wall: Callable[[], datetime] = utcnow,
) -> RunResult:
    """Build (or refresh) the month's drafts and, with `finalize`, finalize them.

    The month's usage is streamed from ClickHouse in tenant order; each tenant's lines
    are built and stored (COPY on PostgreSQL) while the next rows arrive (`_draft_all`);
    the invoices follow, numbered in tenant order (`_store_invoices`)."""
    if now < period.end:
        raise PeriodNotEnded(f"period: {period} has not ended yet (it ends {period.end:%Y-%m-%d})")
    result = RunResult(str(period), finalize)
    repo.lock_runs(session)
    name = str(period)
    period_row = repo.get_period(session, name)
    closed = period_row is not None and period_row.status == "finalized"
    read_at = wall()
    # Drafts are rebuilt whole (a closed month's are its held ones): read, then deleted
    # with their lines; the rebuilt ones are stored again with their id and creation time.
    existing = repo.drafts_of(session, name)
    tenants: set[str] | None = set(existing) if closed else None
    late = late_usage(session, ch, book, period, tenants) if tenants != set() else {}
    issued = set() if closed else repo.issued_tenants(session, name)
    result.unchanged = len(issued) if not closed else repo.count_issued(session, name)
    repo.delete_drafts(session, name)
    if tenants == set():
        rows: Iterator[ch_usage.UsageRow] = iter(())
    else:
        rows = ch_usage.billable_rows(ch, book, period.start, period.end, tenants)
    drafted = _draft_all(session, book, name, rows, late, existing, issued)
    _store_invoices(
        session, name, existing, drafted, finalize=finalize, now=now, stripe=stripe, result=result
    )
    repo.save_period(session, name, "finalized" if finalize else "draft", now=now, read_at=read_at)
    result.status = "finalized" if finalize or closed else "draft"
    return result


@dataclass
class DraftedInvoice:
    tenant_id: str
    invoice_id: str
    lines: int
    total: Decimal
    unpriced_reason: str | None


def _draft_all(
    session: Session,
    book: PriceBook,
    period: str,
    rows: Iterator[ch_usage.UsageRow],
    late: Mapping[str, LateInput],
    existing: Mapping[str, Mapping[str, Any]],
    issued: Collection[str],
) -> list[DraftedInvoice]:
    """Every tenant's invoice of `period` (usage rows in tenant order, late usage, drafts
    to rebuild; `issued` tenants are left alone), in tenant order, lines stored as they
    are built. Tenants without a line get no entry."""
    prices = SpanPrices(book, ch_usage.span_start)
    entries = {e.id: e for e in book.entries}
    # Tenants with late usage or a draft but no usage this month, merged in tenant order.
    others = sorted((set(late) | set(existing)) - set(issued), reverse=True)
    fresh = repo.ordered_invoice_ids()
    out: list[DraftedInvoice] = []

    def one(tenant: str, own: list[ch_usage.UsageRow], writer: repo.LineWriter) -> None:
        if tenant in issued:
            return
        d = draft(own, prices, period, late.get(tenant), entries)
        if not d.lines:
            return
        inv = existing.get(tenant)
        invoice_id = inv["id"] if inv is not None else next(fresh)
        writer.write(invoice_id, d.lines)
        out.append(DraftedInvoice(tenant, invoice_id, len(d.lines), d.total, d.unpriced_reason()))

    with repo.line_writer(session) as writer:
        for tenant, group in groupby(rows, key=itemgetter(0)):
            while others and others[-1] < tenant:
                one(others.pop(), [], writer)
            if others and others[-1] == tenant:
                others.pop()
            one(tenant, list(group), writer)
        while others:
            one(others.pop(), [], writer)
    return out


def _store_invoices(
    session: Session,
    period: str,
    existing: Mapping[str, Mapping[str, Any]],
    drafted: list[DraftedInvoice],
    *,
    finalize: bool,
    now: datetime,
    stripe: bool,
    result: RunResult,
) -> None:
    """The invoices of the drafted lines: numbered in tenant order when finalized (unless
    held), drafts otherwise; the rebuilt drafts' rows are replaced (same id and creation
    time), drafts left without a line are removed."""
    final = [d.tenant_id for d in drafted if finalize and d.unpriced_reason is None]
    first = repo.take_numbers(session, len(final)) if final else 0
    numbers = {t: first + i for i, t in enumerate(final)}
    details = repo.billing_details(session, set(final)) if final else {}
    kept = {d.tenant_id for d in drafted}
    result.removed += sum(1 for t in existing if t not in kept)
    rows: list[dict[str, Any]] = []
    for d in drafted:
        inv = existing.get(d.tenant_id)
        values: dict[str, Any] = {
            "id": d.invoice_id,
            "tenant_id": d.tenant_id,
            "period": period,
            "status": "draft",
            "number": None,
            "currency": "USD",
            "subtotal_usd": d.total,
            "total_usd": d.total,
            "held_reason": d.unpriced_reason if finalize else None,
            "created_at": now,
            "updated_at": now,
        }
        if inv is not None:
            # A draft rebuilt: every column it had, then the new content.
            values = {**inv, **values, "created_at": inv["created_at"], "currency": inv["currency"]}
            result.refreshed += 1
        else:
            result.created += 1
        if d.tenant_id in numbers:
            bill = details.get(d.tenant_id)
            values.update(
                status="finalized",
                number=numbers[d.tenant_id],
                finalized_at=now,
                bill_name=bill.name if bill else None,
                bill_email=bill.email if bill else None,
                bill_address=bill.address if bill else None,
                currency=bill.currency if bill else "USD",
                stripe_status="pending" if stripe else None,
            )
            result.finalized += 1
        elif finalize:
            result.held.append({"tenant_id": d.tenant_id, "reason": d.unpriced_reason or ""})
        rows.append(values)
        result.total += d.total
    repo.insert_invoices(session, rows)
    session.flush()


@dataclass
class Preview:
    tenant_id: str
    period: str
    built: Built
    projected_total: Decimal
    as_of: datetime


def preview(
    session: Session, ch: Client, book: PriceBook, tenant_id: str, now: datetime
) -> Preview:
    """The current month's invoice as it would stand if the month closed at `now`, and
    its projected total at the month's end: the late lines, plus the month's usage as
    forecast by the budgets' method (`month_end_forecast`) rounded to the cent."""
    period = Period.of(now)
    usage = ch_usage.usage(ch, book, period.start, now, [tenant_id])
    late = late_usage(session, ch, book, period, [tenant_id])
    built = build(usage.get(tenant_id, []), book, str(period), late.get(tenant_id))
    spend = ch_usage.exact_cost(usage, book)
    hourly, _ = ch_usage.hourly_spend(ch, book, tenant_id, now - ch_usage.FORECAST_DAYS, now)
    forecast = month_end_forecast(spend, hourly, now)
    late_total = sum((ln.amount for ln in built.lines if ln.late), Decimal("0.00"))
    projected = forecast.quantize(CENT, rounding=ROUND_HALF_UP) + late_total
    return Preview(tenant_id, str(period), built, projected, now)


def usage_rows(usages: Mapping[str, list[Usage[str]]]) -> int:
    return sum(len(v) for v in usages.values())
