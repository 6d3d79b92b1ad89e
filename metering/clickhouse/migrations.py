"""ClickHouse migration runner, safe when several processes migrate at once.

Migrations are numbered, frozen SQL files `migrations/clickhouse/NNNN_verb_object.sql`
(statements separated by `;` at the end of a line, `IF [NOT] EXISTS` everywhere).
Applied versions are recorded in ClickHouse itself, in `schema_migrations`, so the
store carries its own state wherever it lives. A file is never edited once it has
landed: a checksum mismatch with the recorded one stops the runner.

Two replicas starting together (or `metering migrate` beside a starting server on a
shared ClickHouse) must neither apply a migration twice nor fail. ClickHouse has no
advisory locks, but it creates a table name atomically: of several plain `CREATE TABLE
schema_migrations_lock` racing on one server, exactly one succeeds and the others get
TABLE_ALREADY_EXISTS. That table is the lock; its comment names the holder. So:

1. Reading needs no lock and runs no DDL (`applied`, `pending`): /readyz and
   `migrate --dry-run` only read the ledger, and a missing ledger means nothing applied.
2. `migrate` takes the lock (polling every `LOCK_POLL` s while another runner holds it,
   up to `lock_timeout`), then re-reads the ledger, so a runner that waited finds the
   holder's work done and applies nothing. Each migration's statements run, then its
   ledger row is written, still under the lock; the lock is dropped in `finally`.
3. A holder that died (kill -9 mid-migration) leaves its lock behind. A lock older than
   `stale_after` (server clock, default 10 minutes; our migrations take seconds) is
   dropped by the next waiter, which then competes with CREATE again. Two waiters that
   break the same stale lock at once may both end up running; that race is covered by
   the second line of defence: every statement is idempotent (`IF [NOT] EXISTS`, checked
   by a test), a holder re-checks that the lock is still its own before each migration,
   and readers take one ledger row per version, so at worst an idempotent statement runs
   twice, never a failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations" / "clickhouse"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

LEDGER = "schema_migrations"
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
TABLE_EXISTS = (
    "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {name:String}"
)

LOCK_TABLE = "schema_migrations_lock"
# No IF NOT EXISTS: the CREATE that succeeds is the one that holds the lock. No rows:
# the holder is in the comment, which lives in the table's metadata. DDL takes no bound
# parameters, so the comment is a literal made only of `_OWNER_CHARS` (our own string).
CREATE_LOCK = "CREATE TABLE schema_migrations_lock (held UInt8) ENGINE = Memory COMMENT '{owner}'"
_OWNER_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:-]")
SELECT_LOCK = (
    "SELECT comment, dateDiff('second', metadata_modification_time, now())"
    " FROM system.tables WHERE database = currentDatabase() AND name = 'schema_migrations_lock'"
)
DROP_LOCK = "DROP TABLE IF EXISTS schema_migrations_lock"
TABLE_ALREADY_EXISTS = 57
LOCK_POLL = 0.2
LOCK_TIMEOUT = 300.0
STALE_AFTER = 600.0


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


def _table_exists(client: Client, name: str) -> bool:
    return bool(client.query(TABLE_EXISTS, parameters={"name": name}).result_rows[0][0])


def applied(client: Client) -> dict[int, tuple[str, str]]:
    """The ledger (version -> name, checksum), read without DDL; empty if it is missing."""
    if not _table_exists(client, LEDGER):
        return {}
    rows = client.query(SELECT_APPLIED).result_rows
    return {int(v): (str(n), str(c)) for v, n, c in rows}


def pending(client: Client, migrations: list[Migration] | None = None) -> list[Migration]:
    """Migrations not in the ledger yet, in order (read only)."""
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


def lock_holder(client: Client) -> tuple[str, float] | None:
    """(holder, age in seconds by the server's clock) of the migration lock, or None."""
    rows = client.query(SELECT_LOCK).result_rows
    return (str(rows[0][0]), float(rows[0][1])) if rows else None


def _try_lock(client: Client, owner: str) -> bool:
    try:
        client.command(CREATE_LOCK.format(owner=owner))
    except DatabaseError as exc:
        if getattr(exc, "code", None) == TABLE_ALREADY_EXISTS or "TABLE_ALREADY_EXISTS" in str(exc):
            return False
        raise
    return True


@contextmanager
def migration_lock(
    client: Client,
    *,
    timeout: float = LOCK_TIMEOUT,
    stale_after: float = STALE_AFTER,
    owner: str | None = None,
) -> Iterator[str]:
    """Hold the migration lock (see the module docstring); yields the holder's name."""
    owner = owner or f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:12]}"
    owner = _OWNER_UNSAFE.sub("_", owner)[:200]
    deadline = time.monotonic() + timeout
    waiting_logged = False
    while not _try_lock(client, owner):
        holder = lock_holder(client)
        if holder is not None and holder[1] > stale_after:
            log.warning(
                "breaking the ClickHouse migration lock of %r, held %.0f s (stale after %.0f s)",
                holder[0],
                holder[1],
                stale_after,
            )
            client.command(DROP_LOCK)
            continue
        if time.monotonic() > deadline:
            name, age = holder if holder is not None else ("another runner", 0.0)
            raise MigrationError(
                f"the ClickHouse migration lock is held by {name} for {age:.0f} s;"
                f" waited {timeout:.0f} s (a lock older than {stale_after:.0f} s is broken)"
            )
        if not waiting_logged:
            log.info(
                "waiting for the ClickHouse migration lock held by %s",
                holder[0] if holder else "another runner",
            )
            waiting_logged = True
        time.sleep(LOCK_POLL)
    try:
        yield owner
    finally:
        holder = lock_holder(client)
        if holder is not None and holder[0] == owner:
            client.command(DROP_LOCK)


def _holds(client: Client, owner: str) -> bool:
    holder = lock_holder(client)
    return holder is not None and holder[0] == owner


def migrate(
    client: Client,
    *,
    dry_run: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
    stale_after: float = STALE_AFTER,
) -> list[Migration]:
    """Apply pending migrations in order, under the migration lock; return the ones this
    call applied. With dry_run, take no lock, run no DDL and return what is pending."""
    if dry_run:
        return pending(client)
    done: list[Migration] = []
    while pending(client):
        with migration_lock(client, timeout=lock_timeout, stale_after=stale_after) as owner:
            client.command(CREATE_LEDGER)
            # Again, under the lock: whoever held it before may have applied them.
            for migration in pending(client):
                if not _holds(client, owner):
                    # Another runner broke our lock as stale: wait for it like any holder.
                    log.warning("lost the ClickHouse migration lock before %s", migration.name)
                    break
                for statement in migration.statements():
                    client.command(statement)
                client.insert(
                    LEDGER,
                    [[migration.version, migration.name, migration.checksum]],
                    column_names=["version", "name", "checksum"],
                )
                done.append(migration)
    return done
