"""The service's long-lived parts, built once per process and handed to routes and jobs.

`Services.open` connects to nothing: it checks the settings and opens the spools, so the
process comes up (and `/healthz` answers) whatever state the stores are in. `start`
connects to ClickHouse, applies migrations (relational, then ClickHouse), replays the
ingest spools and starts the writers; `keep_starting` retries it with backoff while a
store is unreachable, saying why in `waiting_for` (for /readyz). `close` drains and stops.
The HTTP app, the scheduler and the CLI all go through this one object.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from clickhouse_connect.driver.client import Client
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from billing.prices.book import PriceBookCache
from metering.analytics.deps import ReadPool
from metering.analytics.hours_cache import HoursCache
from metering.analytics.projections import materialize_missing
from metering.auth.service import KeyCache
from metering.budgets.runtime import BudgetRuntime, Cut
from metering.clickhouse import migrations as ch_migrations
from metering.clickhouse.client import check_url, make_client
from metering.db import migrations as relational_migrations
from metering.db.engine import make_engine, make_session_factory
from metering.ingest.decode import EVENTS, PROBES
from metering.ingest.pipeline import StreamPipeline
from metering.ingest.spool import Unavailable
from metering.ingest.store import EVENTS_TABLE, PROBES_TABLE, IngestStore
from metering.ingest.structs import Event, Probe
from metering.settings import Settings
from metering.tenants.numbers import TenantNumbers

log = logging.getLogger(__name__)


_event_key = attrgetter("tenant_id", "project_id")

# Makes a ClickHouse client for (url, database); a parameter so tests can stand in for
# a server that answers only from some attempt on.
ClientFactory = Callable[[str, str], Client]
FIRST_RETRY_DELAY = 1.0  # seconds; doubles after each failed start, up to the cap
MAX_RETRY_DELAY = 30.0
READ_CLIENTS = 4  # ClickHouse clients for concurrent reads (figures, request log)


class StartupProblem(RuntimeError):
    """A start-up step failed; the message names the store ("clickhouse: ...")."""


@dataclass
class Services:
    settings: Settings
    admin_token: str
    engine: Engine
    sessions: sessionmaker[Session]
    events: StreamPipeline[Event]
    probes: StreamPipeline[Probe]
    numbers: TenantNumbers
    budgets: BudgetRuntime
    connect: ClientFactory = make_client
    started: bool = False  # writers running
    ready: bool = False  # started, and start-up hooks done: /readyz says 200
    startup_error: str | None = None  # start-up gave up (a hook failed)
    waiting_for: str | None = None  # why start-up is being retried, e.g. "clickhouse: ..."
    key_cache: KeyCache = field(default_factory=KeyCache)
    prices: PriceBookCache = field(init=False)
    reads: ReadPool = field(init=False)
    hours: HoursCache = field(default_factory=HoursCache)
    _ch: Client | None = None
    _stores: tuple[IngestStore, IngestStore] | None = None
    _stop_starting: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.prices = PriceBookCache(self.sessions)
        self.reads = ReadPool(self._read_client, size=READ_CLIENTS)

    def _read_client(self) -> Client:
        self.ch  # noqa: B018 - raises Unavailable until start-up connected
        return self.connect(
            self.settings.resolved_clickhouse_url, self.settings.clickhouse_database
        )

    @property
    def ch(self) -> Client:
        if self._ch is None:
            raise Unavailable("clickhouse: not connected yet")
        return self._ch

    @classmethod
    def open(
        cls, settings: Settings, admin_token: str, *, connect: ClientFactory = make_client
    ) -> Services:
        """Check the settings and open the spools; connect to nothing yet."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        check_url(settings.resolved_clickhouse_url)  # a bad URL is not worth retrying
        engine = make_engine(settings.resolved_database_url)  # connects on first use
        fsync = settings.spool_fsync == "always"
        numbers = TenantNumbers(engine)
        sessions = make_session_factory(engine)
        budgets = BudgetRuntime(
            sessions,
            smtp_url=settings.smtp_url,
            smtp_from=settings.smtp_from,
            allow_private=settings.webhook_allow_private,
        )
        events: StreamPipeline[Event] = StreamPipeline(
            EVENTS,
            settings.data_dir / "spool" / "events",
            max_spool_bytes=settings.spool_max_bytes,
            fsync=fsync,
            on_keys=numbers.register,
            key_of=_event_key,
            admission=budgets,
        )
        probes: StreamPipeline[Probe] = StreamPipeline(
            PROBES,
            settings.data_dir / "spool" / "probes",
            max_spool_bytes=settings.spool_max_bytes,
            fsync=fsync,
        )
        return cls(
            settings,
            admin_token,
            engine,
            sessions,
            events,
            probes,
            numbers,
            budgets,
            connect=connect,
        )

    def _connect_clickhouse(self) -> None:
        """Make the ClickHouse clients (once): one for reads and jobs, and per stream a
        writer and a reader for the gate's lookups."""
        if self._ch is not None:
            return
        url, database = self.settings.resolved_clickhouse_url, self.settings.clickhouse_database
        made: list[Client] = []
        try:
            for _ in range(5):
                made.append(self.connect(url, database))
        except Exception:
            for client in made:
                client.close()
            raise
        ch, events_writer, events_reader, probes_writer, probes_reader = made
        self._stores = (
            IngestStore(events_writer, EVENTS_TABLE, reader=events_reader),
            IngestStore(probes_writer, PROBES_TABLE, reader=probes_reader),
        )
        self._ch = ch
        self.numbers.attach(ch)

    def migrate(self) -> tuple[list[str], list[str]]:
        """Apply pending relational and ClickHouse migrations; return what was applied."""
        relational = _step("database", lambda: relational_migrations.upgrade(self.engine))
        _step("clickhouse", self._connect_clickhouse)
        clickhouse = _step("clickhouse", lambda: [m.name for m in ch_migrations.migrate(self.ch)])
        return relational, clickhouse

    def start(self) -> None:
        """Connect, migrate, replay spools, start writers: one attempt, which raises
        StartupProblem naming the store that failed. Calling it again resumes. The
        caller marks the services ready once its own start-up work is done too."""
        relational, clickhouse = self.migrate()
        if relational or clickhouse:
            log.info("applied migrations: relational %s, clickhouse %s", relational, clickhouse)
        assert self._stores is not None  # made by migrate
        events_store, probes_store = self._stores
        if not self.events.running:
            _step("database", self.numbers.sync)
            _step("clickhouse", lambda: materialize_missing(self.ch))
            _step("clickhouse", lambda: self.events.start(events_store))
        if not self.budgets.started:
            events = self.events
            cut = Cut(events.hold, events.wait_stored_through, events.release, events.wait_stored)
            _step("clickhouse", lambda: self.budgets.start(self.ch, self.prices, cut))
        if not self.probes.running:
            _step("clickhouse", lambda: self.probes.start(probes_store))
        self.started = True

    def keep_starting(
        self, first_delay: float = FIRST_RETRY_DELAY, max_delay: float = MAX_RETRY_DELAY
    ) -> bool:
        """`start` until it succeeds, waiting `first_delay` doubling up to `max_delay`
        between attempts; False if `stop_starting` was called first."""
        delay = first_delay
        while not self._stop_starting.is_set():
            try:
                self.start()
            except Exception as exc:
                reason = str(exc) if isinstance(exc, StartupProblem) else _describe(exc)
                self.waiting_for = f"{reason} (retrying every {delay:g} s at most)"
                log.warning("start-up: %s; retrying in %g s", reason, delay)
                self._stop_starting.wait(delay)
                delay = min(delay * 2, max_delay)
                continue
            self.waiting_for = None
            return True
        return False

    def stop_starting(self) -> None:
        """Make `keep_starting` give up (the process is shutting down)."""
        self._stop_starting.set()

    def check(self) -> dict[str, str]:
        """Both stores answer (for /readyz, polled often). Migrations are not looked up
        here: `start` applied them before `ready` was set, and that is cached by `ready`
        itself, so a poll costs one `SELECT 1` per store, never DDL or a ledger read."""
        problems: dict[str, str] = {}
        try:
            self.ch.query("SELECT 1")
        except Exception as exc:
            problems["clickhouse"] = f"{type(exc).__name__}: {exc}"
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            problems["database"] = f"{type(exc).__name__}: {exc}"
        for pipeline in (self.events, self.probes):
            error = pipeline.spool.write_error
            if error is not None:  # the spool retries by itself; ready again once it writes
                problems[f"spool_{pipeline.schema.name}"] = f"spool write failing: {error}"
        return problems

    def close(self) -> None:
        self._stop_starting.set()
        self.budgets.stop()
        self.events.stop()  # drains if its writer runs; closes the spool either way
        self.probes.stop()
        self.reads.close()
        self.started = self.ready = False
        self.engine.dispose()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _step(store: str, action: Callable[[], Any]) -> Any:
    """Run one start-up step; a failure becomes StartupProblem("<store>: <error>")."""
    try:
        return action()
    except StartupProblem:
        raise
    except Exception as exc:
        raise StartupProblem(f"{store}: {_describe(exc)}") from exc
