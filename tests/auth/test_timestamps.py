"""Every time the API returns is RFC 3339 with an offset, on SQLite and PostgreSQL alike
(API key timestamps came back as "2026-11-28T06:31:47.987741" on SQLite): relational
times are stored in UTC and read back aware, by the column type itself."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Column, DateTime, Integer, MetaData, Table, insert, select
from sqlalchemy.orm import Session

from billing.db import UTCDateTime
from metering.metadata import metadata
from metering.services import Services
from metering.tenants.models import Tenant

RFC3339_WITH_OFFSET = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
)


def assert_rfc3339_with_offset(value: object) -> datetime:
    assert isinstance(value, str) and RFC3339_WITH_OFFSET.match(value), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None
    return parsed


def test_api_key_times_carry_an_offset(client: TestClient, admin_headers: dict[str, str]) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    created = client.post("/v1/api-keys", json={"scopes": ["ingest"]}, headers=admin_headers)
    assert created.status_code == 201
    assert assert_rfc3339_with_offset(created.json()["created_at"]) >= before
    key_id = created.json()["id"]
    assert client.delete(f"/v1/api-keys/{key_id}", headers=admin_headers).status_code == 204

    # Read back from the database (the create answer echoes the value in memory).
    (listed,) = client.get("/v1/api-keys", headers=admin_headers).json()["api_keys"]
    created_at = assert_rfc3339_with_offset(listed["created_at"])
    revoked_at = assert_rfc3339_with_offset(listed["revoked_at"])
    assert before <= created_at <= revoked_at <= datetime.now(UTC) + timedelta(seconds=5)


def test_times_are_stored_in_utc_and_read_back_aware(services: Services) -> None:
    """Through the mapped type: a time with another offset keeps its instant, comes back
    in UTC; a naive time is refused, since its zone is unknown."""
    plus_two = datetime(2026, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    with Session(services.engine) as session:
        session.add(Tenant(id="acct-tz", first_seen_at=plus_two))
        session.commit()
    with Session(services.engine) as session:
        stored = session.execute(select(Tenant.first_seen_at)).scalar_one()
    assert stored == plus_two
    assert stored.tzinfo is UTC
    assert stored == datetime(2026, 2, 28, 23, 30, tzinfo=UTC)

    with Session(services.engine) as session:
        session.add(Tenant(id="acct-naive", first_seen_at=datetime(2026, 3, 1)))
        with pytest.raises(Exception, match="aware datetime"):
            session.commit()


def test_naive_values_already_stored_read_back_as_utc(services: Services) -> None:
    """A row written without the type (by hand, or before it) is read as UTC."""
    table = Table(
        "tz_probe", MetaData(), Column("id", Integer, primary_key=True), Column("at", DateTime)
    )
    table.create(services.engine)
    try:
        with services.engine.begin() as conn:
            conn.execute(insert(table).values(id=1, at=datetime(2026, 3, 1, 12, 0)))
        typed = Table(
            "tz_probe",
            MetaData(),
            Column("id", Integer, primary_key=True),
            Column("at", UTCDateTime),
        )
        with services.engine.connect() as conn:
            at = conn.execute(select(typed.c.at)).scalar_one()
        assert at == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    finally:
        table.drop(services.engine)


def test_every_relational_time_column_is_utc() -> None:
    """New tables (billing's included) get the type too; a plain DateTime would read back
    naive on SQLite."""
    time_columns = [
        column
        for table in metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, DateTime | UTCDateTime)
    ]
    assert time_columns
    for column in time_columns:
        assert isinstance(column.type, UTCDateTime), f"{column.table.name}.{column.name}"
