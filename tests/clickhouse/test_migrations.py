"""The ClickHouse migration runner, against chDB: fresh, re-run, schema, frozen files."""

from __future__ import annotations

from pathlib import Path

import pytest

from metering.clickhouse import migrations as runner
from metering.clickhouse.tables import TABLES


def live_columns(ch_client, table: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    rows = ch_client.query(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase()"
        " AND table = {t:String} ORDER BY position",
        parameters={"t": table},
    ).result_rows
    return {name: type_ for name, type_ in rows}


def test_fresh_database_gets_every_migration_in_order(ch_client) -> None:  # type: ignore[no-untyped-def]
    applied = runner.migrate(ch_client)
    names = [m.name for m in applied]
    assert names == sorted(names)
    assert names == [m.name for m in runner.load_migrations()]
    recorded = runner.applied(ch_client)
    assert [recorded[v][0] for v in sorted(recorded)] == names


def test_rerun_applies_nothing_and_keeps_rows(ch_client) -> None:  # type: ignore[no-untyped-def]
    runner.migrate(ch_client)
    ch_client.command("INSERT INTO ingested_ids (stream, id) VALUES ('events', 'kept')")
    assert runner.migrate(ch_client) == []
    assert runner.pending(ch_client) == []
    count = ch_client.query("SELECT count() FROM schema_migrations").result_rows[0][0]
    assert count == len(runner.load_migrations())
    assert ch_client.query("SELECT id FROM ingested_ids").result_rows == [("kept",)]


def test_live_tables_match_declared_columns(ch_client) -> None:  # type: ignore[no-untyped-def]
    runner.migrate(ch_client)
    tables = {
        row[0]
        for row in ch_client.query(
            "SELECT name FROM system.tables WHERE database = currentDatabase()"
        ).result_rows
    }
    assert tables == set(TABLES)
    for table, declared in TABLES.items():
        assert live_columns(ch_client, table) == declared, table


def test_every_table_explains_itself(ch_client) -> None:  # type: ignore[no-untyped-def]
    runner.migrate(ch_client)
    comments = dict(
        ch_client.query(
            "SELECT name, comment FROM system.tables WHERE database = currentDatabase()"
        ).result_rows
    )
    assert all(comments[t] for t in TABLES), comments


def test_dry_run_applies_nothing(ch_client) -> None:  # type: ignore[no-untyped-def]
    todo = runner.migrate(ch_client, dry_run=True)
    assert len(todo) == len(runner.load_migrations())
    assert runner.pending(ch_client) == todo


def test_edited_migration_is_refused(ch_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runner.migrate(ch_client)
    edited = [
        runner.Migration(m.version, m.name, m.sql + "\n-- edited\n")
        for m in runner.load_migrations()
    ]
    with pytest.raises(runner.MigrationError, match="frozen"):
        runner.pending(ch_client, edited)


def test_migration_file_names_are_checked(tmp_path: Path) -> None:
    (tmp_path / "1_bad.sql").write_text("SELECT 1")
    with pytest.raises(runner.MigrationError, match="NNNN_verb_object"):
        runner.load_migrations(tmp_path)


def test_statements_split_on_semicolons_and_skip_comments() -> None:
    migration = runner.Migration(
        9,
        "0009_x",
        "-- why\nCREATE TABLE a (x UInt8) ENGINE=Log;\n"
        "-- and\nCREATE TABLE b (x UInt8) ENGINE=Log;\n",
    )
    assert migration.statements() == [
        "CREATE TABLE a (x UInt8) ENGINE=Log",
        "CREATE TABLE b (x UInt8) ENGINE=Log",
    ]
