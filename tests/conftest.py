"""Shared fixtures: real engines, isolated per test.

- ClickHouse: one chDB instance per test process (chDB allows one data path per
  process); each test gets its own ClickHouse database on it, dropped afterwards.
- Relational: SQLite file per test by default; with METERING_TEST_DATABASE_URL set to a
  PostgreSQL URL, each test gets its own schema on that server, dropped afterwards.
- `database_url`, `ch_database` and `settings` are EMPTY stores (the migration tests
  start from nothing). `client` starts the app on stores already at the head revision:
  the real runners (Alembic, metering.clickhouse.migrations) migrate a template once per
  test process, and each `client` gets a copy (the SQLite file; the PostgreSQL schema as
  pg_dump wrote it, when pg_dump is on PATH; the ClickHouse tables, re-created from the
  template's own DDL, and its ledger rows). Start-up then finds nothing pending, as a
  restarted service does. The ClickHouse DDL of the migrations was ~0.2 s of each ~0.5 s
  app start. METERING_TEST_MIGRATE_EACH=1 turns the copies off.
- Parallel runs (pytest-xdist, `-n`): each worker is its own process with its own tmp
  dirs, chDB path and templates; only the PostgreSQL server is shared, one schema a test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from metering.app import create_app, wait_ready
from metering.clickhouse import migrations as ch_migrations
from metering.clickhouse.client import forget_database, make_client
from metering.db import migrations as relational_migrations
from metering.db.engine import make_engine
from metering.metadata import metadata
from metering.services import Services
from metering.settings import Settings

ADMIN_TOKEN = "test-admin-token"
TEST_DATABASE_URL = os.environ.get("METERING_TEST_DATABASE_URL", "")
MIGRATE_EACH = os.environ.get("METERING_TEST_MIGRATE_EACH", "") not in ("", "0")
PG_DUMP = shutil.which("pg_dump")  # without it, PostgreSQL tests migrate each schema

TABLES_IN_SCHEMA = "SELECT count(*) FROM information_schema.tables WHERE table_schema = :s"
TABLES_OF = (
    "SELECT name, create_table_query FROM system.tables WHERE database = {db:String}"
    " ORDER BY metadata_modification_time, name"
)


@dataclass(frozen=True)
class ClickHouseTemplate:
    """A ClickHouse database migrated by the real runner, and its tables' DDL."""

    database: str
    tables: tuple[tuple[str, str], ...]  # (name, CREATE statement naming `database`)

    def ddl_for(self, database: str) -> dict[str, str]:
        # The template's name is unique (random hex): only its qualifiers are replaced.
        return {name: ddl.replace(f"{self.database}.", f"{database}.") for name, ddl in self.tables}

    def copy_to(self, client: Client, database: str) -> None:
        """The template's tables (empty, same DDL) and ledger rows, in `database`."""
        todo = list(self.ddl_for(database).values())
        while todo:  # a table whose DEFAULT reads another one waits for that one
            failed: list[tuple[str, DatabaseError]] = []
            for statement in todo:
                try:
                    client.command(statement)
                except DatabaseError as exc:
                    failed.append((statement, exc))
            if len(failed) == len(todo):
                raise failed[0][1]
            todo = [statement for statement, _ in failed]
        client.command(
            f"INSERT INTO `{database}`.`{ch_migrations.LEDGER}`"
            f" SELECT * FROM `{self.database}`.`{ch_migrations.LEDGER}`"
        )


def _tables(client: Client, database: str) -> list[tuple[str, str]]:
    rows = client.query(TABLES_OF, parameters={"db": database}).result_rows
    return [(str(name), str(ddl)) for name, ddl in rows]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long end-to-end tests (`slow`) first: with xdist workers, one that started last
    would leave the other workers idle while it runs alone (kill -9 crash test: ~35 s)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture(scope="session")
def clickhouse_template(chdb_path: Path) -> ClickHouseTemplate:
    """Migrated once per test process, and checked once: a copy has the same DDL and
    ledger, and the runner finds nothing pending in it."""
    url = f"chdb://{chdb_path}"
    name = f"template_{uuid.uuid4().hex[:12]}"
    client = make_client(url, name)
    ch_migrations.migrate(client)
    template = ClickHouseTemplate(name, tuple(_tables(client, name)))
    probe = f"probe_{uuid.uuid4().hex[:12]}"
    probe_client = make_client(url, probe)
    template.copy_to(probe_client, probe)
    assert dict(_tables(probe_client, probe)) == template.ddl_for(probe)
    assert ch_migrations.pending(probe_client) == []
    assert ch_migrations.applied(probe_client) == ch_migrations.applied(client)
    probe_client.command(f"DROP DATABASE `{probe}`")
    forget_database(url, probe)
    probe_client.close()
    client.close()
    return template


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at the head revision (Alembic, once per test process)."""
    path = tmp_path_factory.mktemp("relational-template") / "metering.db"
    engine = make_engine(f"sqlite:///{path}")
    relational_migrations.upgrade(engine)
    engine.dispose()  # the last connection closes: SQLite checkpoints and drops the WAL
    assert not path.with_name(f"{path.name}-wal").exists()
    return path


def _schema_of(url: str) -> str:
    """The schema of a `database_url` on PostgreSQL (the search_path option in it)."""
    return url.rsplit("search_path%3D", 1)[1].split("&", 1)[0]


def _libpq_url() -> str:
    url = make_url(TEST_DATABASE_URL).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _run_script(url: str, script: str) -> None:
    """Several statements in one round trip (psycopg sends a script without parameters
    as one simple query)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(script)
            cursor.close()
            raw.commit()
        finally:
            raw.close()
    finally:
        engine.dispose()


@dataclass(frozen=True)
class PostgresTemplate:
    """A schema migrated by Alembic, as pg_dump writes it (DDL and rows, no ownership)."""

    schema: str
    script: str  # names `schema`; its CREATE SCHEMA line and psql meta-commands removed

    def copy_to(self, url: str) -> None:
        _run_script(url, self.script.replace(f"{self.schema}.", f"{_schema_of(url)}."))


def _postgres_template(database_url: str) -> PostgresTemplate:
    schema = _schema_of(database_url)
    engine = make_engine(database_url)
    relational_migrations.upgrade(engine)
    engine.dispose()
    dump = subprocess.run(
        [
            *(str(PG_DUMP), f"--dbname={_libpq_url()}", f"--schema={schema}"),
            *("--no-owner", "--no-privileges", "--inserts"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    kept = [
        line
        for line in dump.splitlines()
        if not line.startswith("\\") and line != f"CREATE SCHEMA {schema};"
    ]
    return PostgresTemplate(schema, "\n".join(kept))


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[PostgresTemplate]:
    """Migrated once per test process, and checked once: a copy matches the models and
    stands at the same revision."""
    admin = create_engine(TEST_DATABASE_URL, isolation_level="AUTOCOMMIT")
    schemas = [f"template_{uuid.uuid4().hex[:12]}", f"probe_{uuid.uuid4().hex[:12]}"]
    sep = "&" if "?" in TEST_DATABASE_URL else "?"
    template_url, probe_url = (
        f"{TEST_DATABASE_URL}{sep}options=-csearch_path%3D{schema}" for schema in schemas
    )
    try:
        with admin.connect() as conn:
            for schema in schemas:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        template = _postgres_template(template_url)
        template.copy_to(probe_url)
        probe = make_engine(probe_url)
        with probe.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
        assert relational_migrations.pending_revisions(probe) == []
        probe.dispose()
        yield template
    finally:
        with admin.connect() as conn:
            for schema in schemas:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


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


def _copy_templates(settings: Settings, request: pytest.FixtureRequest) -> None:
    """Bring the test's still-empty stores to the head revision from the templates."""
    if MIGRATE_EACH:
        return
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        target = Path(url.removeprefix("sqlite:///"))
        if not target.exists():
            template: Path = request.getfixturevalue("sqlite_template")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template, target)
    elif url.startswith(TEST_DATABASE_URL or "-") and "search_path%3D" in url and PG_DUMP:
        engine = create_engine(url, poolclass=NullPool)
        with engine.connect() as conn:
            empty = not conn.execute(text(TABLES_IN_SCHEMA), {"s": _schema_of(url)}).scalar()
        engine.dispose()
        if empty:
            pg_template: PostgresTemplate = request.getfixturevalue("postgres_template")
            pg_template.copy_to(url)
    ch_url, database = settings.resolved_clickhouse_url, settings.clickhouse_database
    if ch_url.startswith("chdb://"):
        ch_template: ClickHouseTemplate = request.getfixturevalue("clickhouse_template")
        client = make_client(ch_url, database)
        try:
            if not _tables(client, database):
                ch_template.copy_to(client, database)
        finally:
            client.close()


@pytest.fixture
def client(settings: Settings, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """The app over real stores, started (migrated, writers running)."""
    _copy_templates(settings, request)
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
