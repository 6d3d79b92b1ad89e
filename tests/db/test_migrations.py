"""Alembic revisions and the SQLAlchemy models agree, on SQLite and PostgreSQL
(METERING_TEST_DATABASE_URL selects PostgreSQL; .ci/run runs the suite on both)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from metering.db import migrations as relational_migrations
from metering.db.engine import make_engine
from metering.metadata import metadata

VERSIONS = Path(__file__).parents[2] / "migrations" / "versions"
# Every revision file, in order: 0001_..., 0002_..., each revising the one before.
REVISIONS = sorted(p.name.split("_", 1)[0] for p in VERSIONS.glob("[0-9][0-9][0-9][0-9]_*.py"))


def _diff(engine):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, metadata)


def test_upgrade_from_empty_matches_models(database_url: str) -> None:
    engine = make_engine(database_url)
    applied = relational_migrations.upgrade(engine)
    assert applied == REVISIONS
    assert REVISIONS[:3] == ["0001", "0002", "0003"]
    assert _diff(engine) == []
    tables = set(inspect(engine).get_table_names())
    assert set(metadata.tables) <= tables
    engine.dispose()


def test_upgrade_twice_applies_nothing(database_url: str) -> None:
    engine = make_engine(database_url)
    relational_migrations.upgrade(engine)
    assert relational_migrations.pending_revisions(engine) == []
    assert relational_migrations.upgrade(engine) == []
    engine.dispose()


def test_downgrade_to_base_and_up_again(database_url: str) -> None:
    engine = make_engine(database_url)
    relational_migrations.upgrade(engine)
    config = relational_migrations.alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    assert not set(metadata.tables) & set(inspect(engine).get_table_names())
    relational_migrations.upgrade(engine)
    assert _diff(engine) == []
    engine.dispose()
