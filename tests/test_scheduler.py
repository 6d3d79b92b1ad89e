"""`Scheduler.start` registers the jobs that have a trigger and runs them on it (a failing
run does not stop later ones); the real registry schedules register-tenants always and
the probe job only with targets; register-tenants runs at start."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from metering.scheduler import JOBS, Job, Scheduler
from metering.services import Services

WAIT = 30.0  # bound of every wait below


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_start_schedules_jobs_and_runs_them_on_their_trigger(services: Services) -> None:
    runs: dict[str, int] = {"tick": 0, "broken": 0}
    lock = threading.Lock()

    def counter(name: str, fail: bool = False) -> Callable[[Services], None]:
        def run(got: Services) -> None:
            assert got is services
            with lock:
                runs[name] += 1
            if fail:
                raise RuntimeError("job failed")

        return run

    every_50ms = {"trigger": "interval", "seconds": 0.05}
    jobs = {
        "tick": Job("tick", "counts", counter("tick"), lambda _: every_50ms),
        "broken": Job("broken", "always fails", counter("broken", fail=True), lambda _: every_50ms),
        "off": Job("off", "no trigger", counter("off"), lambda _: None),
    }
    scheduler = Scheduler(services, jobs)
    scheduler.start()
    try:
        assert scheduler.scheduled() == ["broken", "tick"]
        wait_until(lambda: runs["tick"] >= 3 and runs["broken"] >= 3, "three runs of each job")
    finally:
        scheduler.shutdown()
    assert "off" not in runs


def test_registry_schedules_probes_only_with_targets(services: Services) -> None:
    scheduler = Scheduler(services)
    scheduler.start()
    try:
        without = scheduler.scheduled()
        assert "probe" not in without
        assert {"register-tenants", "reconcile-budgets"} <= set(without)
    finally:
        scheduler.shutdown()
    services.settings = services.settings.model_copy(
        update={"probe_targets": "cohere=http://127.0.0.1:9/health"}
    )
    scheduler = Scheduler(services)
    scheduler.start()
    try:
        assert scheduler.scheduled() == sorted([*without, "probe"])
    finally:
        scheduler.shutdown()


def test_register_tenants_runs_at_start(services: Services) -> None:
    """Events stored without their registration (e.g. written by a process that stopped
    before it retried) are registered by the job's first run, right at start."""
    columns = ["event_id", "timestamp", "tenant_id", "project_id", "provider", "model"]
    columns += ["status", "documents", "input_tokens", "latency_ms"]
    now = datetime.now(UTC)
    rows: list[list[Any]] = [
        [f"e{i}", now, f"acct-{i % 2}", "p", "cohere", "m", "ok", 1, 1, 1.0] for i in range(4)
    ]
    services.ch.insert("rerank_events", rows, column_names=columns)

    def tenants() -> list[str]:
        with services.engine.connect() as conn:
            return list(conn.execute(text("SELECT id FROM tenants ORDER BY id")).scalars())

    assert tenants() == []
    scheduler = Scheduler(services, {"register-tenants": JOBS["register-tenants"]})
    scheduler.start()
    try:
        wait_until(lambda: tenants() == ["acct-0", "acct-1"], "the tenants to be registered")
    finally:
        scheduler.shutdown()
