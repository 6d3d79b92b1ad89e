"""The service's long-lived parts, built once per process and handed to routes and jobs.

`Services.open` makes the clients; `start` applies migrations (relational, then
ClickHouse), replays the ingest spools and starts the writers; `close` drains and stops
them. The HTTP app, the scheduler and the CLI all go through this one object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from clickhouse_connect.driver.client import Client
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from metering.auth.service import KeyCache
from metering.clickhouse import migrations as ch_migrations
from metering.clickhouse.client import make_client
from metering.db import migrations as relational_migrations
from metering.db.engine import make_engine, make_session_factory
from metering.ingest.decode import EVENTS, PROBES
from metering.ingest.pipeline import StreamPipeline
from metering.ingest.store import EVENTS_TABLE, PROBES_TABLE, IngestStore
from metering.ingest.structs import Event, Probe
from metering.settings import Settings
from metering.tenants.registration import register_pairs

log = logging.getLogger(__name__)


_event_key = attrgetter("tenant_id", "project_id")


@dataclass
class Services:
    settings: Settings
    admin_token: str
    ch: Client
    engine: Engine
    sessions: sessionmaker[Session]
    events: StreamPipeline[Event]
    probes: StreamPipeline[Probe]
    started: bool = False  # writers running
    ready: bool = False  # started, and start-up hooks done: /readyz says 200
    startup_error: str | None = None
    key_cache: KeyCache = field(default_factory=KeyCache)

    @classmethod
    def open(cls, settings: Settings, admin_token: str) -> Services:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url, database = settings.resolved_clickhouse_url, settings.clickhouse_database
        ch = make_client(url, database)
        engine = make_engine(settings.resolved_database_url)
        fsync = settings.spool_fsync == "always"

        def pipeline_store(table: Any) -> IngestStore:
            return IngestStore(make_client(url, database), table, reader=make_client(url, database))

        events: StreamPipeline[Event] = StreamPipeline(
            EVENTS,
            pipeline_store(EVENTS_TABLE),
            settings.data_dir / "spool" / "events",
            max_spool_bytes=settings.spool_max_bytes,
            fsync=fsync,
            on_keys=lambda pairs: register_pairs(engine, pairs),
            key_of=_event_key,
        )
        probes: StreamPipeline[Probe] = StreamPipeline(
            PROBES,
            pipeline_store(PROBES_TABLE),
            settings.data_dir / "spool" / "probes",
            max_spool_bytes=settings.spool_max_bytes,
            fsync=fsync,
        )
        return cls(settings, admin_token, ch, engine, make_session_factory(engine), events, probes)

    def migrate(self) -> tuple[list[str], list[str]]:
        """Apply pending relational and ClickHouse migrations; return what was applied."""
        relational = relational_migrations.upgrade(self.engine)
        clickhouse = [m.name for m in ch_migrations.migrate(self.ch)]
        return relational, clickhouse

    def start(self) -> None:
        """Migrate, replay spools, start writers. The caller marks the services ready
        once its own start-up work (demo data) is done too."""
        relational, clickhouse = self.migrate()
        if relational or clickhouse:
            log.info("applied migrations: relational %s, clickhouse %s", relational, clickhouse)
        self.events.start()
        self.probes.start()
        self.started = True

    def check(self) -> dict[str, str]:
        """Both stores answer and no migration is pending (for /readyz)."""
        problems: dict[str, str] = {}
        try:
            self.ch.query("SELECT 1")
            if ch_migrations.pending(self.ch):
                problems["clickhouse"] = "migrations pending"
        except Exception as exc:
            problems["clickhouse"] = f"{type(exc).__name__}: {exc}"
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            if relational_migrations.pending_revisions(self.engine):
                problems["database"] = "migrations pending"
        except Exception as exc:
            problems["database"] = f"{type(exc).__name__}: {exc}"
        for pipeline in (self.events, self.probes):
            if pipeline.spool.broken is not None:
                problems[f"spool_{pipeline.schema.name}"] = (
                    f"spool write failed, restart needed: {pipeline.spool.broken}"
                )
        return problems

    def close(self) -> None:
        if self.started:
            self.events.stop()
            self.probes.stop()
        self.started = self.ready = False
        self.engine.dispose()
