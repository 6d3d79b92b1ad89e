"""The invoice tables' queries. Services never commit; the request or job that calls
them does. Bulk writes go through Core statements (a month holds one invoice per tenant)."""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.orm import Session

from billing.db import Base, DecimalText, utcnow
from billing.invoices.builder import Line, LineKey
from billing.invoices.models import (
    InvoiceCounterRow,
    InvoiceLineRow,
    InvoicePeriodRow,
    InvoiceRow,
    TenantBillingRow,
)
from billing.rating import UNIT_NAME, Meter

COUNTER = "invoices"
CHUNK = 5_000  # ids per IN (...) list


def new_invoice_id() -> str:
    return "inv_" + secrets.token_hex(12)


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def lock_runs(session: Session) -> int:
    """Take the invoice-run lock for this transaction (a row lock on PostgreSQL, the write
    lock on SQLite) and return the last invoice number handed out. Every run (API, CLI,
    scheduler, any replica) takes it first, so two runs never interleave."""
    stmt = (
        update(InvoiceCounterRow)
        .where(InvoiceCounterRow.name == COUNTER)
        .values(last_number=InvoiceCounterRow.last_number)
        .returning(InvoiceCounterRow.last_number)
    )
    last = session.execute(stmt).scalar_one_or_none()
    if last is None:  # the migration seeds the row; a database built otherwise gets it here
        session.execute(insert(InvoiceCounterRow).values(name=COUNTER, last_number=0))
        last = session.execute(stmt).scalar_one()
    return int(last)


def take_numbers(session: Session, count: int) -> int:
    """Hand out `count` consecutive numbers (under the run lock); returns the first."""
    stmt = (
        update(InvoiceCounterRow)
        .where(InvoiceCounterRow.name == COUNTER)
        .values(last_number=InvoiceCounterRow.last_number + count)
        .returning(InvoiceCounterRow.last_number)
    )
    last = int(session.execute(stmt).scalar_one())
    return last - count + 1


def get_period(session: Session, period: str) -> InvoicePeriodRow | None:
    return session.get(InvoicePeriodRow, period)


def closed_periods(session: Session, first: str, before: str) -> list[InvoicePeriodRow]:
    """Finalized months in [first, before), oldest first."""
    rows = session.scalars(
        select(InvoicePeriodRow)
        .where(
            InvoicePeriodRow.status == "finalized",
            InvoicePeriodRow.period >= first,
            InvoicePeriodRow.period < before,
        )
        .order_by(InvoicePeriodRow.period)
    )
    return list(rows)


def invoices_of(
    session: Session, period: str, tenants: Collection[str] | None = None
) -> dict[str, InvoiceRow]:
    """The period's invoices by tenant (all, or those of `tenants`)."""
    query = select(InvoiceRow).where(InvoiceRow.period == period)
    if tenants is None:
        return {row.tenant_id: row for row in session.scalars(query)}
    found: dict[str, InvoiceRow] = {}
    for chunk in _chunks(sorted(tenants)):
        rows = session.scalars(query.where(InvoiceRow.tenant_id.in_(chunk)))
        found.update((row.tenant_id, row) for row in rows)
    return found


def draft_tenants(session: Session, period: str) -> set[str]:
    query = select(InvoiceRow.tenant_id).where(
        InvoiceRow.period == period, InvoiceRow.status == "draft"
    )
    rows = session.scalars(query)
    return set(rows)


def count_issued(session: Session, period: str) -> int:
    query = select(func.count()).where(InvoiceRow.period == period, InvoiceRow.status != "draft")
    return int(session.execute(query).scalar_one())


def billed(
    session: Session, tenants: Collection[str], usage_period: str
) -> dict[str, dict[LineKey, int]]:
    """Quantities of `usage_period` on the tenants' issued invoices (every status but
    draft: a voided invoice's usage is not billed again by itself)."""
    out: dict[str, dict[LineKey, int]] = defaultdict(dict)
    L, I = InvoiceLineRow, InvoiceRow  # noqa: E741
    for chunk in _chunks(sorted(tenants)):
        query = (
            select(
                I.tenant_id,
                L.project_id,
                L.provider,
                L.model,
                L.meter,
                L.price_id,
                func.sum(L.quantity),
            )
            .join(I, I.id == L.invoice_id)
            .where(L.usage_period == usage_period, I.status != "draft", I.tenant_id.in_(chunk))
            .group_by(I.tenant_id, L.project_id, L.provider, L.model, L.meter, L.price_id)
        )
        for tenant, project, provider, model, meter, price_id, q in session.execute(query):
            out[tenant][LineKey(project, provider, model, cast(Meter, meter), price_id)] = int(q)
    return dict(out)


def line_rows(invoice_id: str, lines: Iterable[Line]) -> list[dict[str, Any]]:
    return [
        {
            "invoice_id": invoice_id,
            "position": i,
            "project_id": ln.key.project_id,
            "provider": ln.key.provider,
            "model": ln.key.model,
            "meter": ln.key.meter,
            "price_id": ln.key.price_id,
            "quantity": ln.quantity,
            "unit": ln.unit,
            "unit_price_usd": ln.unit_price,
            "amount_usd": ln.amount,
            "usage_period": ln.usage_period,
            "late": ln.late,
            "stripe_item_id": None,
        }
        for i, ln in enumerate(lines)
    ]


def _copy(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Rows into `table` with PostgreSQL's COPY, in the session's transaction (a month's
    close writes hundreds of thousands of invoices and millions of lines: COPY is an order
    of magnitude faster than batched INSERTs). Values are converted as the column types
    do: exact decimals as their text, times as aware UTC datetimes."""
    columns = [c.name for c in table.columns]
    decimal_columns = {c.name for c in table.columns if isinstance(c.type, DecimalText)}
    raw = session.connection().connection.driver_connection
    assert raw is not None
    with (
        raw.cursor() as cursor,
        cursor.copy(
            f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"  # names from the model
        ) as copy,
    ):
        for row in rows:
            copy.write_row(
                [
                    format(row[c], "f")
                    if c in decimal_columns and row.get(c) is not None
                    else row.get(c)
                    for c in columns
                ]
            )


def _insert(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = model.__table__
    assert isinstance(table, Table)
    if session.get_bind().dialect.name == "postgresql":
        _copy(session, table, rows)
        return
    for chunk in _chunks(rows, 50_000):
        session.execute(insert(model), list(chunk))


def insert_invoices(session: Session, rows: list[dict[str, Any]]) -> None:
    _insert(session, InvoiceRow, rows)


def update_invoices(session: Session, rows: list[dict[str, Any]]) -> None:
    """Each dict has `id` and the columns to set (ORM bulk update by primary key)."""
    if rows:
        session.execute(update(InvoiceRow), rows)


def delete_invoices(session: Session, ids: Sequence[str]) -> None:
    for chunk in _chunks(list(ids)):
        session.execute(delete(InvoiceLineRow).where(InvoiceLineRow.invoice_id.in_(chunk)))
        session.execute(delete(InvoiceRow).where(InvoiceRow.id.in_(chunk)))


LINE_COLUMNS = (
    "invoice_id",
    "position",
    "project_id",
    "provider",
    "model",
    "meter",
    "price_id",
    "quantity",
    "unit",
    "unit_price_usd",
    "amount_usd",
    "usage_period",
    "late",
    "stripe_item_id",
)


def _copy_lines(session: Session, lines: Sequence[tuple[str, Sequence[Line]]]) -> None:
    """Lines through COPY, each row built in column order straight from the built line
    (no per-row dict): a month's close writes millions of them."""
    raw = session.connection().connection.driver_connection
    assert raw is not None
    with (
        raw.cursor() as cursor,
        cursor.copy(f"COPY invoice_lines ({', '.join(LINE_COLUMNS)}) FROM STDIN") as copy,
    ):
        write = copy.write_row
        for invoice_id, built in lines:
            for i, ln in enumerate(built):
                k = ln.key
                price = ln.unit_price
                write(
                    (
                        invoice_id,
                        i,
                        k.project_id,
                        k.provider,
                        k.model,
                        k.meter,
                        k.price_id,
                        ln.quantity,
                        UNIT_NAME[k.meter],
                        None if price is None else format(price, "f"),
                        format(ln.amount, "f"),
                        ln.usage_period,
                        ln.late,
                        None,
                    )
                )


def replace_lines(
    session: Session, delete_of: Sequence[str], lines: Sequence[tuple[str, Sequence[Line]]]
) -> None:
    """Delete the lines of the invoices `delete_of`, then store `lines` (invoice id, its
    built lines in order)."""
    for chunk in _chunks(list(delete_of)):
        session.execute(delete(InvoiceLineRow).where(InvoiceLineRow.invoice_id.in_(chunk)))
    if session.get_bind().dialect.name == "postgresql":
        _copy_lines(session, lines)
        return
    rows = [row for invoice_id, built in lines for row in line_rows(invoice_id, built)]
    _insert(session, InvoiceLineRow, rows)


def save_period(
    session: Session,
    period: str,
    status: str,
    *,
    now: datetime,
    read_at: datetime | None = None,
) -> None:
    row = session.get(InvoicePeriodRow, period)
    if row is None:
        row = InvoicePeriodRow(period=period, status=status)
        session.add(row)
    if status == "finalized" and row.finalized_at is None:
        row.finalized_at = now
        row.read_at = read_at
    if status == "draft":
        row.drafted_at = now
    row.status = "finalized" if "finalized" in (row.status, status) else status
    session.flush()


def billing_of(session: Session, tenants: Collection[str]) -> dict[str, TenantBillingRow]:
    found: dict[str, TenantBillingRow] = {}
    for chunk in _chunks(sorted(tenants)):
        query = select(TenantBillingRow).where(TenantBillingRow.tenant_id.in_(chunk))
        found.update((row.tenant_id, row) for row in session.scalars(query))
    return found


def put_billing(
    session: Session,
    tenant_id: str,
    name: str | None,
    email: str | None,
    address: str | None,
    currency: str,
) -> TenantBillingRow:
    row = session.get(TenantBillingRow, tenant_id)
    if row is None:
        row = TenantBillingRow(tenant_id=tenant_id)
        session.add(row)
    row.name, row.email, row.address, row.currency = name, email, address, currency
    row.updated_at = utcnow()
    session.flush()
    return row


def get_invoice(session: Session, invoice_id: str) -> InvoiceRow | None:
    return session.get(InvoiceRow, invoice_id)


def lines_of(session: Session, invoice_ids: Sequence[str]) -> dict[str, list[InvoiceLineRow]]:
    out: dict[str, list[InvoiceLineRow]] = {i: [] for i in invoice_ids}
    for chunk in _chunks(list(invoice_ids)):
        rows = session.scalars(
            select(InvoiceLineRow)
            .where(InvoiceLineRow.invoice_id.in_(chunk))
            .order_by(InvoiceLineRow.invoice_id, InvoiceLineRow.position)
        )
        for row in rows:
            out[row.invoice_id].append(row)
    return out


def list_invoices(
    session: Session,
    *,
    tenant_id: str | None,
    period: str | None,
    limit: int,
    after: tuple[str, str] | None,
) -> list[InvoiceRow]:
    """Newest period first, then by tenant; `after` = (period, tenant_id) of the last seen."""
    query = select(InvoiceRow)
    if tenant_id is not None:
        query = query.where(InvoiceRow.tenant_id == tenant_id)
    if period is not None:
        query = query.where(InvoiceRow.period == period)
    if after is not None:
        query = query.where(
            (InvoiceRow.period < after[0])
            | ((InvoiceRow.period == after[0]) & (InvoiceRow.tenant_id > after[1]))
        )
    query = query.order_by(InvoiceRow.period.desc(), InvoiceRow.tenant_id).limit(limit)
    return list(session.scalars(query))


def invoices_with_usage_of(session: Session, usage_period: str) -> list[InvoiceRow]:
    """Every invoice with a line of `usage_period` (its own month's, or late lines)."""
    ids = select(InvoiceLineRow.invoice_id).where(InvoiceLineRow.usage_period == usage_period)
    query = select(InvoiceRow).where(
        (InvoiceRow.period == usage_period) | InvoiceRow.id.in_(ids.distinct())
    )
    return list(session.scalars(query))


def set_status(session: Session, invoice: InvoiceRow, status: str, at: datetime) -> None:
    invoice.status = status
    if status == "paid":
        invoice.paid_at = at
    elif status == "void":
        invoice.voided_at = at
    invoice.updated_at = at
    session.flush()


def money_or_none(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")
