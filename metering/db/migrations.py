"""Apply the Alembic revisions programmatically (used by `metering migrate` and `serve`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

ROOT = Path(__file__).resolve().parents[2]


def alembic_config() -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    return config


def pending_revisions(engine: Engine) -> list[str]:
    script = ScriptDirectory.from_config(alembic_config())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    todo: list[str] = []
    for rev in script.walk_revisions():
        if rev.revision in current:
            break
        todo.append(rev.revision)
    return list(reversed(todo))


def upgrade(engine: Engine, *, sql_only: bool = False) -> list[str]:
    """Upgrade to head; return the revisions applied (or that would be, with sql_only)."""
    todo = pending_revisions(engine)
    if sql_only or not todo:
        return todo
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return todo


def print_sql(engine: Engine) -> None:
    """Print the SQL of the pending revisions (offline mode) to stdout."""
    config = alembic_config()
    url = engine.url.render_as_string(hide_password=False).replace("%", "%%")
    config.set_main_option("sqlalchemy.url", url)
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if pending_revisions(engine):
        command.upgrade(config, f"{current}:head" if current else "head", sql=True)
