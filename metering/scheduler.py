"""The in-process scheduler (APScheduler) and the one registry of its jobs.

Every job is a function of `Services`, registered in `JOBS` with its trigger; `metering
serve` schedules them, and `metering jobs run NAME` runs one once from a shell (`run_once`).
Later work (invoice finalization, budget checks, webhook retries) adds entries here.

`jobs run` needs the stores, not the ingest stack: it never starts the pipelines (no spool
replay at open, no gate rebuild, no writer threads). A job that ingests (the probe job)
still submits through its stream's pipeline, so its rows take the one exactly-once path of
`POST /v1/probes` (admitted, spooled and fsync'd before they count); `run_once` then drains
that stream's spool synchronously with `StreamPipeline.replay`, the crash-recovery path,
which asks ClickHouse which rows of each record it already has and inserts only the others
(the gate, never rebuilt here, is not what keeps the rows unique: that check is).
A stream the job did not write to is left alone. The spool is ordered, so draining the
probe spool also stores whatever a crashed `serve` had left in it, exactly once, which is
what that server's next start would have done; the data-dir lock keeps `serve` and `jobs
run` from sharing a spool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler

from metering.ingest.pipeline import StreamPipeline
from metering.ingest.store import EVENTS_TABLE, PROBES_TABLE, IngestStore, StreamTable
from metering.invoices.job import run_invoices
from metering.probes.job import run_probes
from metering.tenants.registration import register_from_clickhouse

if TYPE_CHECKING:
    from metering.services import Services

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    name: str
    description: str
    run: Callable[[Services], Any]
    # APScheduler trigger arguments, computed from the settings; None = not scheduled.
    trigger: Callable[[Services], dict[str, Any] | None]


def _probe_trigger(services: Services) -> dict[str, Any] | None:
    if not services.settings.probe_targets:
        return None
    return {"trigger": "interval", "seconds": services.settings.probe_interval_seconds}


def _reconcile_budgets(services: Services) -> dict[str, Any]:
    if not services.budgets.started:
        return {"skipped": "budgets run inside `metering serve` only"}
    return services.budgets.reconcile()


def _register_tenants(services: Services) -> int:
    return register_from_clickhouse(services.ch, services.engine)


JOBS: dict[str, Job] = {
    job.name: job
    for job in [
        Job(
            "register-tenants",
            "register every tenant and project that has events (backstop; hourly and at start)",
            _register_tenants,
            lambda _: {"trigger": "interval", "hours": 1, "next_run_time": datetime.now(UTC)},
        ),
        Job(
            "reconcile-budgets",
            "rebuild budget spend exactly from ClickHouse, report drift, fire forecast alerts",
            _reconcile_budgets,
            lambda _: {"trigger": "interval", "minutes": 1},
        ),
        Job(
            "invoices",
            "draft each month's invoices when it ends; finalize after METERING_INVOICE_GRACE_DAYS",
            run_invoices,
            lambda _: {"trigger": "interval", "minutes": 10, "next_run_time": datetime.now(UTC)},
        ),
        Job(
            "probe",
            "probe METERING_PROBE_TARGETS once and ingest the results as uptime probes",
            run_probes,
            _probe_trigger,
        ),
    ]
}


def run_once(services: Services, name: str) -> Any:
    """Run the job `name` once, outside `serve`, on services that were opened but not
    started: connect and migrate the stores, run the job, store what it spooled. Returns
    what the job returned; raises KeyError for an unknown name."""
    job = JOBS[name]
    if services.started:
        raise RuntimeError("run_once is for services whose ingest stack is not running")
    services.migrate()  # connects ClickHouse; no replay, no writer
    result = job.run(services)
    for pipeline, table in ((services.events, EVENTS_TABLE), (services.probes, PROBES_TABLE)):
        if pipeline.lag > 0:  # the job spooled rows and no writer runs: store them now
            _drain(services, pipeline, table)
    return result


def _drain(services: Services, pipeline: StreamPipeline[Any], table: StreamTable) -> int:
    """Store a never-started pipeline's spool in ClickHouse, exactly once, through the
    crash-recovery path (`replay`), on this thread. The pipeline was opened without its
    ClickHouse side, so its spool is closed and reopened by one that has it."""
    pipeline.stop()  # no writer ran: this only closes the spool, the job's records written
    spool = pipeline.spool
    drain: StreamPipeline[Any] = StreamPipeline(
        pipeline.schema,
        spool.dir,
        max_spool_bytes=spool.max_bytes,
        fsync=spool.fsync,
        on_keys=services.numbers.register if table is EVENTS_TABLE else None,
        store=IngestStore(services.ch, table),
    )
    try:
        return drain.replay()
    finally:
        drain.stop()


class Scheduler:
    """Runs the registered jobs (or `jobs`, for tests) on their triggers inside `serve`."""

    def __init__(self, services: Services, jobs: Mapping[str, Job] | None = None) -> None:
        self.services = services
        self.jobs = JOBS if jobs is None else jobs
        self._scheduler = BackgroundScheduler(timezone="UTC")

    def start(self) -> None:
        for job in self.jobs.values():
            trigger = job.trigger(self.services)
            if trigger is None:
                continue
            self._scheduler.add_job(
                self._guarded(job),
                id=job.name,
                name=job.name,
                max_instances=1,
                coalesce=True,
                **trigger,
            )
        self._scheduler.start()

    def _guarded(self, job: Job) -> Callable[[], None]:
        def run() -> None:
            try:
                job.run(self.services)
            except Exception:
                log.exception("job %s failed", job.name)

        return run

    def scheduled(self) -> list[str]:
        """Names of the jobs that have a trigger (the ones `start` scheduled)."""
        return sorted(job.id for job in self._scheduler.get_jobs())

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
