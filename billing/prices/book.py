"""The price book's repository: list entries, add one, load the book for rating.

Services never commit; the request or job that calls them does.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from billing.prices.models import PriceRow
from billing.rating import PriceBook, PriceEntry


@dataclass(frozen=True)
class NewPrice:
    provider: str
    model: str
    effective_from: datetime
    currency: str
    input_per_1m_tokens: Decimal
    output_per_1m_tokens: Decimal
    per_1k_doc_query_pairs: Decimal


class PriceConflict(ValueError):
    """An entry for the same (provider, model, effective_from) with other prices exists."""


def to_entry(row: PriceRow) -> PriceEntry:
    return PriceEntry(
        id=row.id,
        provider=row.provider,
        model=row.model,
        effective_from=row.effective_from,
        currency=row.currency,
        input_per_1m_tokens=row.input_per_1m_tokens,
        output_per_1m_tokens=row.output_per_1m_tokens,
        per_1k_doc_query_pairs=row.per_1k_doc_query_pairs,
    )


def list_prices(session: Session) -> list[PriceEntry]:
    rows = session.scalars(
        select(PriceRow).order_by(PriceRow.provider, PriceRow.model, PriceRow.effective_from)
    )
    return [to_entry(row) for row in rows]


def _same(row: PriceRow, new: NewPrice) -> bool:
    return (
        row.currency == new.currency
        and row.input_per_1m_tokens == new.input_per_1m_tokens
        and row.output_per_1m_tokens == new.output_per_1m_tokens
        and row.per_1k_doc_query_pairs == new.per_1k_doc_query_pairs
    )


def add_price(session: Session, new: NewPrice) -> tuple[PriceEntry, bool]:
    """Add an entry; returns (entry, created). Posting the same entry again is a no-op
    (a retried request); other prices for an existing (provider, model,
    effective_from) raise PriceConflict: entries are never edited."""
    existing = session.scalar(
        select(PriceRow).where(
            PriceRow.provider == new.provider,
            PriceRow.model == new.model,
            PriceRow.effective_from == new.effective_from,
        )
    )
    if existing is not None:
        if _same(existing, new):
            return to_entry(existing), False
        raise PriceConflict(
            "effective_from: an entry for this provider and model already takes effect at"
            " this instant with other prices; post a new effective_from instead"
        )
    row = PriceRow(id="price_" + secrets.token_hex(12), **new.__dict__)
    session.add(row)
    session.flush()
    return to_entry(row), True


class PriceBookCache:
    """The book as last read, for the read endpoints; reloaded when older than `ttl`
    or when this process added an entry. Another replica's new entry is seen within
    `ttl` seconds."""

    def __init__(self, sessions: sessionmaker[Session], ttl: float = 2.0) -> None:
        self._sessions = sessions
        self._ttl = ttl
        self._lock = threading.Lock()
        self._book: PriceBook | None = None
        self._loaded = 0.0

    def get(self) -> PriceBook:
        with self._lock:
            if self._book is None or time.monotonic() - self._loaded > self._ttl:
                with self._sessions() as session:
                    self._book = PriceBook(list_prices(session))
                self._loaded = time.monotonic()
            return self._book

    def invalidate(self) -> None:
        with self._lock:
            self._book = None
