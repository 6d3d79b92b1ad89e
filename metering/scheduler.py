"""The in-process scheduler (APScheduler) and the one registry of its jobs.

Every job is a function of `Services`, registered in `JOBS` with its trigger; `metering
serve` schedules them, and `metering jobs run NAME` runs one once from a shell. Later
work (invoice finalization, budget checks, webhook retries) adds entries here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler

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
            "probe",
            "probe METERING_PROBE_TARGETS once and ingest the results as uptime probes",
            run_probes,
            _probe_trigger,
        ),
    ]
}


class Scheduler:
    """Runs the registered jobs on their triggers inside `metering serve`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._scheduler = BackgroundScheduler(timezone="UTC")

    def start(self) -> None:
        for job in JOBS.values():
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

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
