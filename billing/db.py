"""The declarative base every relational table of the service is declared on.

It lives in `billing` so that billing can own tables (prices, budgets, invoices) without
importing `metering`; `metering` declares its own tables (tenants, API keys) on the same
base, so one metadata and one Alembic history cover both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import DateTime, Dialect, MetaData, String
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, stored in UTC and always read back as an aware UTC datetime.

    `DateTime(timezone=True)` alone is not enough: SQLite has no time zone type, so
    SQLAlchemy stores the wall-clock digits and drops the offset, and reads come back
    naive (the API then printed times without an offset). PostgreSQL's `timestamptz`
    returns aware values in the session's zone. This type converts every value to UTC on
    the way in, refuses naive ones (their zone is unknown), and marks what it reads as
    UTC, on both databases. The column type in the database stays
    `DateTime(timezone=True)`, so migrations are unchanged.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise ValueError(f"UTCDateTime needs an aware datetime, got {value!r}")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # A `Mapped[datetime]` column without an explicit type is a UTCDateTime too.
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime}


class DecimalText(TypeDecorator[Decimal]):
    """An exact decimal, stored as its text.

    SQLite has no exact decimal type (SQLAlchemy's Numeric goes through float there), and
    money must never pass through a float. Text keeps every digit on both databases; the
    values are never compared or summed in SQL (rating happens in Python).
    """

    impl = String(64)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if not isinstance(value, Decimal) or not value.is_finite():
            raise ValueError(f"DecimalText needs a finite Decimal, got {value!r}")
        return format(value, "f")

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value)
