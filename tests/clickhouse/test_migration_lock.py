"""The ClickHouse migration lock: runners that race apply each migration once and fail
none; a dead holder's lock is broken, a live one is waited for (bounded); reading the
ledger (and so /readyz) runs no DDL."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from metering.clickhouse import migrations as runner
from metering.clickhouse.client import make_client
from metering.services import Services

WAIT = 30.0  # bound of every wait below


def ledger_rows(client: Any) -> list[tuple[int, str]]:
    if not runner.applied(client):
        return []
    rows = client.query("SELECT version, name FROM schema_migrations ORDER BY version")
    return [(int(v), str(n)) for v, n in rows.result_rows]


def tables(client: Any) -> set[str]:
    rows = client.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    return {str(r[0]) for r in rows.result_rows}


class CountingClient:
    """A client that counts the DDL it runs, by statement text (no private fields)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.commands: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def command(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self.commands.append(sql)
        return self.client.command(sql, *args, **kwargs)


def test_racing_runners_apply_each_migration_once(chdb_path: Path, ch_database: str) -> None:
    every = runner.load_migrations()
    clients = [CountingClient(make_client(f"chdb://{chdb_path}", ch_database)) for _ in range(3)]
    start = threading.Barrier(len(clients), timeout=WAIT)
    results: list[list[runner.Migration]] = []
    errors: list[BaseException] = []

    def run(client: CountingClient) -> None:
        try:
            start.wait()
            results.append(runner.migrate(client))  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), "a runner did not finish"
    assert errors == []
    applied_by_all = sorted(m.version for result in results for m in result)
    assert applied_by_all == [m.version for m in every]  # each by exactly one runner
    assert ledger_rows(clients[0]) == [(m.version, m.name) for m in every]
    statements = [s for c in clients for s in c.commands if s in every[0].statements()]
    assert len(statements) == len(every[0].statements())
    assert runner.LOCK_TABLE not in tables(clients[0])  # released


def test_a_waiting_runner_starts_once_the_lock_is_released(
    ch_client: Any, chdb_path: Path, ch_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=runner.__name__)
    other = make_client(f"chdb://{chdb_path}", ch_database)
    result: dict[str, Any] = {}
    with runner.migration_lock(ch_client, owner="holder"):
        waiter = threading.Thread(target=lambda: result.update(applied=runner.migrate(other)))
        waiter.start()
        deadline = time.monotonic() + WAIT
        while "waiting for the ClickHouse migration lock held by holder" not in caplog.text:
            assert time.monotonic() < deadline, "the second runner never waited for the lock"
            assert waiter.is_alive(), "the second runner finished while the lock was held"
            time.sleep(0.02)
        assert ledger_rows(ch_client) == []  # nothing applied while the lock is held
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert [m.name for m in result["applied"]] == [m.name for m in runner.load_migrations()]


def test_a_live_lock_is_waited_for_a_bounded_time(ch_client: Any) -> None:
    with (
        runner.migration_lock(ch_client, owner="busy-replica"),
        pytest.raises(runner.MigrationError, match="held by busy-replica"),
    ):
        runner.migrate(ch_client, lock_timeout=0.5)
    assert ledger_rows(ch_client) == []
    assert runner.LOCK_TABLE not in tables(ch_client)  # the holder released it


def test_a_dead_holders_lock_is_broken(ch_client: Any) -> None:
    ch_client.command(runner.CREATE_LOCK.format(owner="killed mid-migration"))
    assert runner.lock_holder(ch_client) is not None
    applied = runner.migrate(ch_client, lock_timeout=5, stale_after=-1)
    assert [m.name for m in applied] == [m.name for m in runner.load_migrations()]
    assert runner.lock_holder(ch_client) is None


def test_reading_the_ledger_runs_no_ddl(ch_client: Any) -> None:
    counting = CountingClient(ch_client)
    assert runner.pending(counting) == runner.load_migrations()  # type: ignore[arg-type]
    assert runner.migrate(counting, dry_run=True) == runner.load_migrations()  # type: ignore[arg-type]
    assert counting.commands == []
    assert tables(ch_client) == set()


def test_every_statement_is_idempotent() -> None:
    """The lock's second line of defence: a statement run twice changes nothing."""
    for migration in runner.load_migrations():
        for statement in migration.statements():
            assert re.search(r"\bIF (NOT )?EXISTS\b", statement), (migration.name, statement)


def test_readyz_reads_no_migration_state(client: TestClient, services: Services) -> None:
    """/readyz asks both stores to answer; migrations were applied before `ready`."""
    seen: list[str] = []
    real_query, real_command = services.ch.query, services.ch.command

    def query(sql: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(sql)
        return real_query(sql, *args, **kwargs)

    def command(sql: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(sql)
        return real_command(sql, *args, **kwargs)

    def relational(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        seen.append(sql)

    services.ch.query = query  # type: ignore[method-assign]
    services.ch.command = command  # type: ignore[method-assign]
    event.listen(services.engine, "before_cursor_execute", relational)
    try:
        for _ in range(3):
            assert client.get("/readyz").status_code == 200
    finally:
        services.ch.query = real_query  # type: ignore[method-assign]
        services.ch.command = real_command  # type: ignore[method-assign]
        event.remove(services.engine, "before_cursor_execute", relational)
    assert seen.count("SELECT 1") == 6, seen  # each store, each call
    migration_state = ("schema_migrations", "alembic_version", "CREATE")
    assert not [sql for sql in seen if any(word in sql for word in migration_state)], seen
