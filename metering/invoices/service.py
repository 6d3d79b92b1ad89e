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

import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from clickhouse_connect.driver.client import Client
from sqlalchemy.orm import Session

from billing.budgets.forecast import month_end_forecast
from billing.invoices import repository as repo
from billing.invoices.builder import CENT, Built, Line, LineKey, build, quantities
from billing.invoices.models import InvoiceRow
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
    """Build (or refresh) the month's drafts and, with `finalize`, finalize them."""
    if now < period.end:
        raise PeriodNotEnded(f"period: {period} has not ended yet (it ends {period.end:%Y-%m-%d})")
    result = RunResult(str(period), finalize)
    repo.lock_runs(session)
    name = str(period)
    period_row = repo.get_period(session, name)
    closed = period_row is not None and period_row.status == "finalized"
    read_at = wall()
    if closed:
        existing = repo.invoices_of(session, name, repo.draft_tenants(session, name))
        tenants: set[str] | None = set(existing)
        usage = ch_usage.usage(ch, book, period.start, period.end, tenants) if tenants else {}
    else:
        existing = repo.invoices_of(session, name)
        tenants = None
        usage = ch_usage.usage(ch, book, period.start, period.end)
    late = late_usage(session, ch, book, period, tenants) if tenants != set() else {}
    issued = {t for t, i in existing.items() if i.status != "draft"}
    result.unchanged = len(issued) if not closed else repo.count_issued(session, name)
    built: dict[str, Built] = {}
    prices = {e.id: e for e in book.entries}
    for tenant in sorted((set(usage) | set(late) | set(existing)) - issued):
        built[tenant] = build(usage.get(tenant, []), book, name, late.get(tenant), prices)
    _write(session, name, existing, built, finalize=finalize, now=now, stripe=stripe, result=result)
    repo.save_period(session, name, "finalized" if finalize else "draft", now=now, read_at=read_at)
    result.status = "finalized" if finalize or closed else "draft"
    return result


def _write(
    session: Session,
    period: str,
    existing: Mapping[str, InvoiceRow],
    built: Mapping[str, Built],
    *,
    finalize: bool,
    now: datetime,
    stripe: bool,
    result: RunResult,
) -> None:
    final = [t for t, b in sorted(built.items()) if b.lines and finalize and not b.unpriced]
    first = repo.take_numbers(session, len(final)) if final else 0
    numbers = {t: first + i for i, t in enumerate(final)}
    details = repo.billing_of(session, final) if final else {}
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    removes: list[str] = []
    lines: list[tuple[str, list[Line]]] = []
    for tenant, b in sorted(built.items()):
        inv = existing.get(tenant)
        if not b.lines:
            if inv is not None:
                removes.append(inv.id)
                result.removed += 1
            continue
        values: dict[str, Any] = {
            "status": "draft",
            "number": None,
            "subtotal_usd": b.subtotal,
            "total_usd": b.total,
            "held_reason": b.unpriced_reason() if finalize else None,
            "updated_at": now,
        }
        if tenant in numbers:
            bill = details.get(tenant)
            values.update(
                status="finalized",
                number=numbers[tenant],
                finalized_at=now,
                bill_name=bill.name if bill else None,
                bill_email=bill.email if bill else None,
                bill_address=bill.address if bill else None,
                currency=bill.currency if bill else "USD",
                stripe_status="pending" if stripe else None,
            )
            result.finalized += 1
        elif finalize:
            result.held.append({"tenant_id": tenant, "reason": values["held_reason"] or ""})
        if inv is None:
            invoice_id = "inv_" + secrets.token_hex(12)
            inserts.append(
                {"id": invoice_id, "tenant_id": tenant, "period": period, "created_at": now}
                | {"currency": "USD"}
                | values
            )
            result.created += 1
        else:
            invoice_id = inv.id
            updates.append({"id": invoice_id, **values})
            result.refreshed += 1
        lines.append((invoice_id, b.lines))
        result.total += b.total
    repo.delete_invoices(session, removes)
    repo.update_invoices(session, updates)
    repo.insert_invoices(session, inserts)
    repo.replace_lines(session, [u["id"] for u in updates], lines)
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
