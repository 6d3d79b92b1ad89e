"""Fixtures of the simulate tests: a migrated relational store and a backfilled one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client
from sqlalchemy import Engine

from metering.clickhouse import migrations as ch_migrations
from metering.db import migrations as relational_migrations
from metering.db.engine import make_engine
from metering.simulate.backfill import backfill
from tests.simulate.helpers import PLAN, Filled


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    relational_migrations.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def filled(ch_client: Client, engine: Engine) -> Filled:
    ch_migrations.migrate(ch_client)
    report = backfill(ch_client, engine, PLAN)
    return Filled(ch_client, engine, report)
