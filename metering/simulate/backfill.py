"""Backfill: a window of simulated traffic straight into ClickHouse and the relational
store. It writes at engine speed, not through HTTP: numpy draws the model's numeric
columns in fixed chunks of `CHUNK_ROWS` (bounded memory; a per-chunk RNG, so the data
depend only on the arguments), clickhouse-connect ships them column-oriented to a Memory
staging table (numbers only: ~4M rows/s), and one `INSERT ... SELECT` per chunk turns
them into `rerank_events` rows, ids and names formatted inside the engine (far cheaper
than 100M Python strings); a second one writes the ids to `ingested_ids`. A worker
thread draws chunk k+1 while ClickHouse stores chunk k. Who sends each event is drawn
from an RNG stream of its own, so a cheap first pass finds every (tenant, project) pair
and a third thread registers them (the slowest part: ~30 s for a seed month's 630K
rows in SQLite) while the events are written. A seed month (24.5M events, 210K tenants)
takes ~50 s on 2 cores (bench/backfill.py, bench/RESULTS.md).

Event ids are `sim-<seed>-<n>` (probes `sim-<seed>-probe-<n>`): a backfill refuses to
run, writing nothing, when ids with its prefix are stored already, so a re-run cannot
double-count; another `--seed` adds more traffic. Timestamps stay inside the contract's
400-day acceptance window, so the data reads like any gateway's.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from clickhouse_connect.driver.client import Client
from sqlalchemy import Engine

from metering.ingest.structs import MAX_AGE, MAX_FUTURE
from metering.simulate.generate import EventColumns, ProbeColumns, generate_events, generate_probes
from metering.simulate.model import (
    ERROR_TYPES,
    I64,
    MODELS,
    PROVIDERS,
    U8,
    draw_senders,
    make_tenants,
    minute_weights,
)
from metering.tenants.numbers import TenantNumbers
from metering.tenants.registration import register_pairs

CHUNK_ROWS = 1 << 20
REGISTER_BATCH = 20_000  # pairs per register_pairs call (one transaction each)

STAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n", "UInt64"),
    ("ts", "Int64"),
    ("tenant", "UInt32"),
    ("project", "UInt8"),
    ("provider", "UInt8"),
    ("model", "UInt8"),
    ("error", "UInt8"),
    ("http_status", "UInt16"),
    ("queries", "UInt16"),
    ("documents", "UInt32"),
    ("input_tokens", "UInt64"),
    ("latency_ms", "Float64"),
    ("fallbacks", "UInt8"),
    ("fb1_provider", "UInt8"),
    ("fb1_error", "UInt8"),
    ("fb1_http", "UInt16"),
    ("fb1_latency", "Float64"),
    ("fb2_provider", "UInt8"),
    ("fb2_error", "UInt8"),
    ("fb2_http", "UInt16"),
    ("fb2_latency", "Float64"),
)
STAGE_PREFIX = "_simulate_stage_"

CREATE_STAGE = "CREATE TABLE {table} ({columns}) ENGINE = Memory"
DROP_STAGE = "DROP TABLE IF EXISTS {table}"
TRUNCATE_STAGE = "TRUNCATE TABLE {table}"

# Formats the staged numbers into event rows; names must match TenantTable's formatting.
INSERT_EVENTS = """
INSERT INTO rerank_events (event_id, timestamp, tenant_id, project_id, api_key_id, provider,
    model, region, status, http_status, error_type, queries, documents, input_tokens,
    output_tokens, latency_ms, fallbacks)
SELECT
    concat({prefix:String}, '-', toString(n)),
    fromUnixTimestamp64Milli(ts, 'UTC'),
    concat('acct-', leftPad(toString(tenant), {width:UInt8}, '0')),
    concat('proj-', leftPad(toString(tenant), {width:UInt8}, '0'), '-', toString(project)),
    concat('key-', leftPad(toString(tenant), {width:UInt8}, '0'), '-', toString(project)),
    {providers:Array(String)}[provider + 1],
    {models:Array(String)}[model + 1],
    {regions:Array(String)}[provider + 1],
    if(error = 0, 'ok', 'error'),
    http_status,
    {errors:Array(String)}[error + 1],
    queries, documents, input_tokens, 0, latency_ms,
    arraySlice([
        ({providers:Array(String)}[fb1_provider + 1], {models:Array(String)}[model + 1],
         {regions:Array(String)}[fb1_provider + 1], fb1_latency,
         {errors:Array(String)}[fb1_error + 1], fb1_http),
        ({providers:Array(String)}[fb2_provider + 1], {models:Array(String)}[model + 1],
         {regions:Array(String)}[fb2_provider + 1], fb2_latency,
         {errors:Array(String)}[fb2_error + 1], fb2_http)
    ], 1, fallbacks)
FROM {stage}
"""
INSERT_EVENT_IDS = """
INSERT INTO ingested_ids (stream, id)
SELECT 'events', concat({prefix:String}, '-', toString(n)) FROM {stage}
"""
INSERT_PROBE_IDS = """
INSERT INTO ingested_ids (stream, id)
SELECT 'probes', probe_id FROM uptime_probes
WHERE timestamp >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')
  AND timestamp < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')
  AND startsWith(probe_id, {probe_prefix:String})
"""
EXISTING_SIM_IDS = """
SELECT count() FROM ingested_ids
WHERE stream IN ('events', 'probes') AND startsWith(id, {prefix_dash:String})
"""
EXISTING_SIM_EVENTS = """
SELECT count() FROM rerank_events
WHERE timestamp >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')
  AND timestamp < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')
  AND startsWith(event_id, {prefix_dash:String})
"""

_PREFIX = re.compile(r"^[A-Za-z0-9_.:]{1,40}(-[A-Za-z0-9_.:]{1,40})?$")


class BackfillError(ValueError):
    """The backfill cannot run as asked (nothing was written)."""


class AlreadyBackfilled(BackfillError):
    """Ids of this backfill's prefix are stored already."""


@dataclass(frozen=True)
class BackfillPlan:
    days: float
    events: int
    tenants: int
    seed: int
    end: datetime
    id_prefix: str = ""

    @property
    def prefix(self) -> str:
        return self.id_prefix or f"sim-{self.seed}"

    @property
    def end_ms(self) -> int:
        return int(self.end.timestamp() * 1000)

    @property
    def start_ms(self) -> int:
        return self.end_ms - round(self.days * 86_400_000)

    def validate(self, now: datetime) -> None:
        if self.end.tzinfo is None:
            raise BackfillError("--end: must include a UTC offset")
        if not 0 < self.days <= MAX_AGE.days:
            raise BackfillError(f"--days: must be > 0 and at most {MAX_AGE.days}")
        if self.events < 0:
            raise BackfillError("--events: must be >= 0")
        if self.tenants < 1:
            raise BackfillError("--tenants: must be >= 1")
        if self.seed < 0:
            raise BackfillError("--seed: must be >= 0")
        if self.end > now + MAX_FUTURE:
            raise BackfillError("--end: must not be more than 5 minutes in the future")
        if self.end - timedelta(days=self.days) < now - MAX_AGE + timedelta(hours=1):
            raise BackfillError(
                "--end/--days: events older than 400 days fall outside the contract's window"
            )
        if not _PREFIX.match(self.prefix):
            raise BackfillError(f"id prefix {self.prefix!r}: use letters, digits, '_.:'")


@dataclass
class BackfillReport:
    events: int = 0
    probes: int = 0
    tenants: int = 0
    projects: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


class Progress(Protocol):
    def __call__(self, done: int, total: int) -> None: ...


def _chunk_times(
    counts: I64, bin_start: I64, bin_len: I64, lo: int, hi: int, rng: np.random.Generator
) -> I64:
    """Timestamps of events lo..hi-1 of the window (events are ordered by minute)."""
    cum = np.cumsum(counts)
    minute = np.searchsorted(cum, np.arange(lo, hi, dtype=np.int64), side="right")
    return np.asarray(
        bin_start[minute] + (rng.random(hi - lo) * bin_len[minute]).astype(np.int64),
        dtype=np.int64,
    )


def _stage_columns(n0: int, cols: EventColumns) -> Sequence[Sequence[Any]]:
    """The staged columns (numpy arrays: clickhouse-connect writes them as raw buffers)."""
    columns: list[npt.NDArray[Any]] = [
        np.arange(n0, n0 + len(cols), dtype=np.uint64),
        cols.timestamp_ms,
        cols.tenant,
        cols.project,
        cols.provider,
        cols.model,
        cols.error,
        cols.http_status,
        cols.queries,
        cols.documents,
        cols.input_tokens,
        cols.latency_ms,
        cols.fallbacks,
        cols.fb_provider[0],
        cols.fb_error[0],
        cols.fb_http_status[0],
        cols.fb_latency_ms[0],
        cols.fb_provider[1],
        cols.fb_error[1],
        cols.fb_http_status[1],
        cols.fb_latency_ms[1],
    ]
    return cast("Sequence[Sequence[Any]]", columns)


class Backfill:
    """Generates a plan's events chunk by chunk (a worker thread draws chunk k+1 while
    ClickHouse stores chunk k) and its probes, then registers the tenants."""

    def __init__(self, plan: BackfillPlan) -> None:
        self.plan = plan
        self.tenants = make_tenants(plan.tenants, plan.seed)
        bins, weights = minute_weights(plan.start_ms, plan.end_ms)
        self.bin_start = bins
        self.bin_len = np.minimum(bins + 60_000, plan.end_ms) - bins
        rng = np.random.default_rng([plan.seed, 1])
        self.counts = (
            rng.multinomial(plan.events, weights / weights.sum()).astype(np.int64)
            if plan.events and len(weights)
            else np.zeros(len(weights), dtype=np.int64)
        )

    def chunk(self, lo: int) -> EventColumns:
        hi = min(self.plan.events, lo + CHUNK_ROWS)
        rng = np.random.default_rng([self.plan.seed, 2, lo // CHUNK_ROWS])
        times = _chunk_times(self.counts, self.bin_start, self.bin_len, lo, hi, rng)
        return generate_events(rng, self.tenants, times, self.senders(lo))

    def senders(self, lo: int) -> tuple[npt.NDArray[np.intp], U8]:
        """Who sends chunk `lo`'s events: its own RNG stream, so that `used_projects`
        can draw it alone, cheaply, before any chunk is generated."""
        hi = min(self.plan.events, lo + CHUNK_ROWS)
        rng = np.random.default_rng([self.plan.seed, 5, lo // CHUNK_ROWS])
        return draw_senders(rng, self.tenants, hi - lo)

    def used_projects(self) -> npt.NDArray[np.bool_]:
        """Which projects (global index) send at least one event of the plan."""
        used = np.zeros(self.tenants.total_projects, dtype=bool)
        for lo in range(0, self.plan.events, CHUNK_ROWS):
            rank, project = self.senders(lo)
            used[self.tenants.project_offset[rank] + project - 1] = True
        return used

    def probes(self) -> ProbeColumns:
        rng = np.random.default_rng([self.plan.seed, 3])
        return generate_probes(rng, self.plan.start_ms, self.plan.end_ms)

    def probe_ids(self, count: int) -> list[str]:
        prefix = f"{self.plan.prefix}-probe-"
        return [f"{prefix}{i}" for i in range(count)]

    def event_ids(self, lo: int, count: int) -> list[str]:
        return [f"{self.plan.prefix}-{i}" for i in range(lo, lo + count)]

    def run(self, ch: Client, engine: Engine, progress: Progress | None = None) -> BackfillReport:
        plan = self.plan
        report = BackfillReport()
        started = time.perf_counter()
        existing = self.existing(ch)
        if existing:
            raise AlreadyBackfilled(
                f"{existing:,} events/probes with ids {plan.prefix}-* are already stored "
                f"(an earlier backfill with --seed {plan.seed}); nothing written. "
                "Use another --seed to add more simulated traffic."
            )
        stage = STAGE_PREFIX + secrets.token_hex(6)
        columns = ", ".join(f"{name} {kind}" for name, kind in STAGE_COLUMNS)
        ch.command(CREATE_STAGE.replace("{table}", stage).replace("{columns}", columns))
        params = {
            "prefix": plan.prefix,
            "width": self.tenants.width,
            "providers": [p.name for p in PROVIDERS],
            "regions": [p.region for p in PROVIDERS],
            "models": list(MODELS),
            "errors": list(ERROR_TYPES),
        }
        timings = dict.fromkeys(
            ("numbers", "generate", "stage", "events", "ids", "probes", "register"), 0.0
        )
        names = [name for name, _ in STAGE_COLUMNS]
        starts = list(range(0, plan.events, CHUNK_ROWS))
        # Who sends what is drawn first (a cheap pass of its own RNG stream), so that the
        # registration of tenants and projects, which is slow (register_pairs: ~75 us a
        # row in SQLite, ~50 s for a seed month's 630K), runs from the start in its own
        # thread, while another thread draws chunk k+1 and ClickHouse stores chunk k
        # (chDB releases the GIL while it works).
        used = self.used_projects()
        pairs = self.tenants.pairs(used)
        # Tenants are numbered (and the numbers published to ClickHouse) before any of
        # their rows is inserted: each row is stamped with its tenant's number.
        t_numbers = time.perf_counter()
        TenantNumbers(engine, ch).register_tenants(tenant for tenant, _ in pairs)
        timings["numbers"] = time.perf_counter() - t_numbers
        with (
            ThreadPoolExecutor(1, thread_name_prefix="simulate-gen") as generator,
            ThreadPoolExecutor(1, thread_name_prefix="simulate-reg") as registrar,
        ):
            registered = [
                registrar.submit(register_pairs, engine, pairs[i : i + REGISTER_BATCH])
                for i in range(0, len(pairs), REGISTER_BATCH)
            ]
            ahead = generator.submit(self.chunk, starts[0]) if starts else None
            try:
                for k, lo in enumerate(starts):
                    t0 = time.perf_counter()
                    assert ahead is not None
                    cols = ahead.result()
                    if k + 1 < len(starts):
                        ahead = generator.submit(self.chunk, starts[k + 1])
                    t1 = time.perf_counter()
                    ch.insert(
                        stage, _stage_columns(lo, cols), column_names=names, column_oriented=True
                    )
                    t2 = time.perf_counter()
                    ch.command(INSERT_EVENTS.replace("{stage}", stage), parameters=params)
                    t3 = time.perf_counter()
                    ch.command(
                        INSERT_EVENT_IDS.replace("{stage}", stage),
                        parameters={"prefix": plan.prefix},
                    )
                    ch.command(TRUNCATE_STAGE.replace("{table}", stage))
                    t4 = time.perf_counter()
                    timings["generate"] += t1 - t0
                    timings["stage"] += t2 - t1
                    timings["events"] += t3 - t2
                    timings["ids"] += t4 - t3
                    report.events += len(cols)
                    if progress is not None:
                        progress(report.events, plan.events)
            except BaseException:
                for future in registered:
                    future.cancel()
                raise
            finally:
                ch.command(DROP_STAGE.replace("{table}", stage))
            t0 = time.perf_counter()
            report.probes = self._store_probes(ch)
            t1 = time.perf_counter()
            for future in registered:
                future.result()
            timings["probes"] = t1 - t0
            timings["register"] = time.perf_counter() - t1  # the wait after the inserts
        report.projects = len(pairs)
        report.tenants = len({tenant for tenant, _ in pairs})
        report.seconds = time.perf_counter() - started
        report.timings = timings
        return report

    def existing(self, ch: Client) -> int:
        """How many ids of this plan's prefix are stored already (in either table)."""
        params: dict[str, Any] = {
            "prefix_dash": self.plan.prefix + "-",
            "start_ms": self.plan.start_ms,
            "end_ms": self.plan.end_ms,
        }
        ids = int(ch.query(EXISTING_SIM_IDS, parameters=params).result_rows[0][0])
        if ids:
            return ids
        return int(ch.query(EXISTING_SIM_EVENTS, parameters=params).result_rows[0][0])

    def _store_probes(self, ch: Client) -> int:
        cols = self.probes()
        if not len(cols):
            return 0
        ids = self.probe_ids(len(cols))
        names = [p.name for p in PROVIDERS]
        regions = [p.region for p in PROVIDERS]
        provider = cols.provider.tolist()
        error = np.where(cols.ok, "", np.where(cols.timed_out, "timeout", "HTTP 503")).tolist()
        ch.insert(
            "uptime_probes",
            cast(
                "Sequence[Sequence[Any]]",
                [
                    ids,
                    [datetime.fromtimestamp(ms / 1000, UTC) for ms in cols.timestamp_ms.tolist()],
                    [names[p] for p in provider],
                    [regions[p] for p in provider],
                    cols.ok.tolist(),
                    cols.latency_ms,
                    cols.http_status,
                    error,
                ],
            ),
            column_names=[
                "probe_id",
                "timestamp",
                "provider",
                "region",
                "ok",
                "latency_ms",
                "http_status",
                "error",
            ],
            column_oriented=True,
        )
        ch.command(
            INSERT_PROBE_IDS,
            parameters={
                "start_ms": self.plan.start_ms,
                "end_ms": self.plan.end_ms,
                "probe_prefix": f"{self.plan.prefix}-probe-",
            },
        )
        return len(ids)


def backfill(
    ch: Client,
    engine: Engine,
    plan: BackfillPlan,
    *,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> BackfillReport:
    """Write `plan` into ClickHouse (events, probes, their ids) and register its tenants.

    Raises BackfillError (nothing written) for an invalid plan and AlreadyBackfilled when
    ids with the plan's prefix exist.
    """
    plan.validate(now or datetime.now(UTC))
    return Backfill(plan).run(ch, engine, progress)
