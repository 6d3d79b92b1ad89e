"""Shared fixtures: real engines, isolated per test.

- ClickHouse: one chDB instance per test process (chDB allows one data path per
  process); each test gets its own ClickHouse database on it, dropped afterwards.
- Relational: SQLite file per test by default; with METERING_TEST_DATABASE_URL set to a
  PostgreSQL URL, each test gets its own schema on that server, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from metering.app import create_app, wait_ready
from metering.clickhouse.client import forget_database, make_client
from metering.services import Services
from metering.settings import Settings

ADMIN_TOKEN = "test-admin-token"
TEST_DATABASE_URL = os.environ.get("METERING_TEST_DATABASE_URL", "")


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def ch_database(chdb_path: Path) -> Iterator[str]:
    """A fresh ClickHouse database name on the shared chDB instance."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    client = make_client(f"chdb://{chdb_path}", "default")
    client.command(f"DROP DATABASE IF EXISTS `{name}`")
    forget_database(f"chdb://{chdb_path}", name)


@pytest.fixture
def ch_client(chdb_path: Path, ch_database: str):  # type: ignore[no-untyped-def]
    return make_client(f"chdb://{chdb_path}", ch_database)


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """An empty relational database: SQLite file, or a fresh PostgreSQL schema."""
    if not TEST_DATABASE_URL:
        yield f"sqlite:///{tmp_path / 'metering.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(TEST_DATABASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in TEST_DATABASE_URL else "?"
    yield f"{TEST_DATABASE_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def settings(tmp_path: Path, chdb_path: Path, ch_database: str, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        clickhouse_url=f"chdb://{chdb_path}",
        clickhouse_database=ch_database,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The app over real stores, started (migrated, writers running)."""
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as test_client:
        wait_ready(app)
        yield test_client


@pytest.fixture
def services(client: TestClient) -> Services:
    result: Services = client.app.state.services  # type: ignore[attr-defined]
    return result


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
