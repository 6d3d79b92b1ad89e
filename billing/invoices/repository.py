"""The invoice tables' queries. Services never commit; the request or job that calls
them does. Bulk writes go through Core statements (a month holds one invoice per tenant)."""

from __future__ import annotations

import re
import secrets
import time
from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.orm import Session

from billing.db import Base, DecimalText, utcnow
from billing.invoices.builder import LineKey, LineTuple
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


def ordered_invoice_ids() -> Iterator[str]:
    """Fresh invoice ids for one run, ascending: `inv_` + the run's start in epoch ms (12
    hex digits) + a counter from a random start (12 hex digits). A month's close writes
    its invoices and lines in this order, so the tables' primary-key indexes grow at
    their right edge instead of at random places (half the time to store the lines)."""
    now_ms = time.time_ns() // 1_000_000
    seq = secrets.randbits(46)
    while True:
        yield f"inv_{now_ms & 0xFFFF_FFFF_FFFF:012x}{seq:012x}"
        seq += 1


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


def drafts_of(session: Session, period: str) -> dict[str, dict[str, Any]]:
    """The period's drafts by tenant, every column as plain values (no ORM objects: a
    month's close rebuilds hundreds of thousands of them)."""
    t = InvoiceRow.__table__
    assert isinstance(t, Table)
    query = select(t).where(t.c.period == period, t.c.status == "draft")
    return {row["tenant_id"]: dict(row) for row in session.execute(query).mappings()}


def issued_tenants(session: Session, period: str) -> set[str]:
    query = select(InvoiceRow.tenant_id).where(
        InvoiceRow.period == period, InvoiceRow.status != "draft"
    )
    return set(session.scalars(query))


def delete_drafts(session: Session, period: str) -> None:
    """Every draft of the period and its lines (a close rebuilds them; run under the run
    lock, in the close's transaction)."""
    drafts = select(InvoiceRow.id).where(InvoiceRow.period == period, InvoiceRow.status == "draft")
    plain = {"synchronize_session": False}
    session.execute(
        delete(InvoiceLineRow).where(InvoiceLineRow.invoice_id.in_(drafts)),
        execution_options=plain,
    )
    session.execute(
        delete(InvoiceRow).where(InvoiceRow.period == period, InvoiceRow.status == "draft"),
        execution_options=plain,
    )


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
    columns = [c.name for c in table.columns]
    for chunk in _chunks(rows, 50_000):  # one statement: every row has every column
        session.execute(insert(model), [{c: row.get(c) for c in columns} for row in chunk])


def insert_invoices(session: Session, rows: list[dict[str, Any]]) -> None:
    _insert(session, InvoiceRow, rows)


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


_NULL = "\\N"  # COPY's text format: a null
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")


def _copy_text(value: str) -> str:
    """A text field of COPY's text format, its special characters escaped."""
    if _COPY_SPECIAL.search(value) is None:
        return value
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def _copy_block(invoice_id: str, lines: Sequence[LineTuple]) -> str:
    """An invoice's lines as rows of COPY's text format, in LINE_COLUMNS order."""
    block = "".join(
        [
            f"{invoice_id}\t{i}\t{project}\t{provider}\t{model}\t{meter}\t"
            f"{_NULL if price_id is None else price_id}\t{quantity}\t{UNIT_NAME[meter]}\t"
            f"{_NULL if unit_price is None else unit_price}\t{amount}\t{usage_period}\t"
            f"{'t' if late else 'f'}\t\\N\n"
            for i, (
                project,
                provider,
                model,
                meter,
                price_id,
                quantity,
                unit_price,
                amount,
                usage_period,
                late,
            ) in enumerate(lines)
        ]
    )
    # The text fields hold no tab, newline, carriage return or backslash (ids and names
    # never do) unless these counts say otherwise: then each field is escaped.
    n = len(lines)
    nulls = n + sum(ln[4] is None for ln in lines) + sum(ln[6] is None for ln in lines)
    if (
        block.count("\t") == 13 * n
        and block.count("\n") == n
        and block.count("\\") == nulls
        and "\r" not in block
    ):
        return block
    return "".join(
        "\t".join(
            [
                _copy_text(invoice_id),
                str(i),
                *(_copy_text(v) for v in ln[:4]),
                "\\N" if ln[4] is None else _copy_text(ln[4]),
                str(ln[5]),
                UNIT_NAME[ln[3]],
                "\\N" if ln[6] is None else ln[6],
                ln[7],
                _copy_text(ln[8]),
                "t" if ln[9] else "f",
                "\\N",
            ]
        )
        + "\n"
        for i, ln in enumerate(lines)
    )


class LineWriter:
    """Stores invoices' lines as they are built, in the session's transaction: through
    one COPY on PostgreSQL (text blocks of about 1 MB: the server stores one while the
    next is built), batched INSERTs elsewhere."""

    FLUSH_CHARS = 1 << 20
    BATCH_ROWS = 50_000

    def __init__(self, session: Session, copy: Any | None) -> None:
        self._session = session
        self._copy = copy
        self._parts: list[str] = []
        self._chars = 0
        self._rows: list[dict[str, Any]] = []
        self.lines = 0

    def write(self, invoice_id: str, lines: Sequence[LineTuple]) -> None:
        self.lines += len(lines)
        if self._copy is not None:
            block = _copy_block(invoice_id, lines)
            self._parts.append(block)
            self._chars += len(block)
            if self._chars >= self.FLUSH_CHARS:
                self.flush()
            return
        self._rows.extend(
            dict(
                zip(
                    ("invoice_id", "position", *LINE_TUPLE_COLUMNS),
                    (invoice_id, i, *ln),
                    strict=True,
                )
            )
            for i, ln in enumerate(lines)
        )
        if len(self._rows) >= self.BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._copy is not None:
            if self._parts:
                self._copy.write("".join(self._parts))
                self._parts, self._chars = [], 0
            return
        if self._rows:
            rows = [
                r
                | {
                    "unit": UNIT_NAME[r["meter"]],
                    "unit_price_usd": None
                    if r["unit_price_usd"] is None
                    else Decimal(r["unit_price_usd"]),
                    "amount_usd": Decimal(r["amount_usd"]),
                    "stripe_item_id": None,
                }
                for r in self._rows
            ]
            self._session.execute(insert(InvoiceLineRow), rows)
            self._rows = []


LINE_TUPLE_COLUMNS = (
    "project_id",
    "provider",
    "model",
    "meter",
    "price_id",
    "quantity",
    "unit_price_usd",
    "amount_usd",
    "usage_period",
    "late",
)


@contextmanager
def line_writer(session: Session) -> Iterator[LineWriter]:
    """A `LineWriter` for the session's transaction; everything written is stored when
    the block exits (no other statement may run on the session inside it on PostgreSQL:
    the COPY holds the connection)."""
    if session.get_bind().dialect.name != "postgresql":
        writer = LineWriter(session, None)
        yield writer
        writer.flush()
        return
    raw = session.connection().connection.driver_connection
    assert raw is not None
    with (
        raw.cursor() as cursor,
        cursor.copy(f"COPY invoice_lines ({', '.join(LINE_COLUMNS)}) FROM STDIN") as copy,
    ):
        writer = LineWriter(session, copy)
        yield writer
        writer.flush()


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


class BillingDetails(NamedTuple):
    name: str | None
    email: str | None
    address: str | None
    currency: str


def billing_details(session: Session, tenants: Collection[str]) -> dict[str, BillingDetails]:
    """The tenants' billing details (those that have any), for a month's close: plain
    rows; for many tenants, the whole table is read once (one query, no ORM objects)
    rather than in chunks of ids."""
    t = TenantBillingRow
    query = select(t.tenant_id, t.name, t.email, t.address, t.currency)
    if len(tenants) <= CHUNK:
        query = query.where(t.tenant_id.in_(sorted(tenants)))
    wanted = tenants if isinstance(tenants, set | frozenset) else set(tenants)
    return {
        tenant: BillingDetails(name, email, address, currency)
        for tenant, name, email, address, currency in session.execute(query)
        if tenant in wanted
    }


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
