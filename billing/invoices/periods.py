"""Billing periods: calendar months in UTC, written `YYYY-MM`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

PATTERN = r"^(19[7-9]\d|2[0-2]\d\d)-(0[1-9]|1[0-2])$"  # 1970-01 .. 2299-12
_PERIOD = re.compile(PATTERN)


class BadPeriod(ValueError):
    """Not a `YYYY-MM` month."""


@dataclass(frozen=True, order=True, slots=True)
class Period:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Period:
        match = _PERIOD.match(text)
        if match is None:
            raise BadPeriod("period: must be YYYY-MM")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def of(cls, t: datetime) -> Period:
        utc = t.astimezone(UTC)
        return cls(utc.year, utc.month)

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.next().start

    def next(self) -> Period:
        return Period(self.year + self.month // 12, self.month % 12 + 1)

    def previous(self) -> Period:
        return Period(self.year - (self.month == 1), (self.month - 2) % 12 + 1)

    def minus(self, months: int) -> Period:
        index = self.year * 12 + self.month - 1 - months
        return Period(index // 12, index % 12 + 1)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"
