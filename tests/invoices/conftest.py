"""Invoice test helpers that need fixtures: the CLI on the test's stores."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from metering import cli
from metering.settings import Settings

CliRunner = Callable[..., tuple[int, str]]


@pytest.fixture
def run_cli(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> CliRunner:
    """`metering ...` in this process, on the test's stores; returns (exit code, stdout)."""
    monkeypatch.setenv("METERING_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("METERING_CLICKHOUSE_URL", settings.resolved_clickhouse_url)
    monkeypatch.setenv("METERING_CLICKHOUSE_DATABASE", settings.clickhouse_database)
    monkeypatch.setenv("METERING_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("METERING_ADMIN_TOKEN", "test-admin-token")

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(list(args))
        return code, capsys.readouterr().out

    return run
