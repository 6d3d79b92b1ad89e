"""ClickHouse migration runner.

Migrations are numbered, frozen SQL files `migrations/clickhouse/NNNN_verb_object.sql`
(statements separated by `;` at the end of a line, `IF [NOT] EXISTS` everywhere).
Applied versions are recorded in ClickHouse itself, in `schema_migrations`, so the
store carries its own state wherever it lives. A file is never edited once it has
landed: a checksum mismatch with the recorded one stops the runner.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations" / "clickhouse"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY version
COMMENT 'Applied ClickHouse migrations (one row per version)'
"""
SELECT_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self) -> list[str]:
        body = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        )
        return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_verb_object.sql")
        found.append(Migration(int(match.group(1)), path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {directory}")
    return found


def applied(client: Client) -> dict[int, tuple[str, str]]:
    client.command(CREATE_LEDGER)
    rows = client.query(SELECT_APPLIED).result_rows
    return {int(v): (str(n), str(c)) for v, n, c in rows}


def pending(client: Client, migrations: list[Migration] | None = None) -> list[Migration]:
    migrations = load_migrations() if migrations is None else migrations
    done = applied(client)
    todo: list[Migration] = []
    for migration in migrations:
        recorded = done.get(migration.version)
        if recorded is None:
            todo.append(migration)
        elif recorded[1] != migration.checksum:
            raise MigrationError(
                f"ClickHouse migration {migration.name} changed after it was applied; "
                "migrations are frozen: add a new one instead"
            )
    return todo


def migrate(client: Client, *, dry_run: bool = False) -> list[Migration]:
    """Apply pending migrations in order; return them. With dry_run, apply nothing."""
    todo = pending(client)
    for migration in todo:
        if dry_run:
            continue
        for statement in migration.statements():
            client.command(statement)
        client.insert(
            "schema_migrations",
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
        )
    return todo
