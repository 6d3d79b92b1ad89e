"""Simulated gateway traffic shaped like the seed product page (`metering simulate`).

    metering simulate backfill --days 30 [--events 24500000] [--tenants 210000]
                               [--seed 1] [--end 2026-11-27T00:00:00Z]
    metering simulate live --url http://127.0.0.1:8000 --key KEY --rate 200
                           --duration 60 [--seed 1] [--tenants 2000]

Why the model looks as it does
------------------------------
The dashboard, the provider table and the invoices are only convincing over data with
the shape of the real thing, so the traffic model reproduces the seed page's figures
(30 days: 24.5M requests, 3.8B documents, 210K active accounts, 99.9x% uptime, and the
provider comparison table) with the distributions such traffic has in practice:

- **Providers** (`PROVIDERS`): llmapi / cohere / azure / bedrock with the page's regions,
  typical latencies and uptimes; traffic shares 55/20/15/10 % (the gateway routes most
  traffic to its cheapest, fastest provider). Mostly `rerank-4-pro`, some `rerank-3.5`.
- **Time**: a daily cycle peaking at 13:00 UTC with a 3x peak/trough ratio (human-driven
  search traffic follows the working day) and a 20 % dip on Saturdays and Sundays. The
  total is split over the window's minutes with one multinomial draw, so `--events`
  lands exactly and per-second peaks stay Poisson-like.
- **Tenants**: heavy-tailed (Zipf-Mandelbrot weights `(rank + 3) ** -1`): the top 1 % of
  accounts send ~60 % of the requests, and even the smallest of 210K tenants expects
  ~10 requests a month, so nearly all of them are active as on the page. Each tenant has
  1-5 projects (bigger tenants more), each project its own API key; the first project
  takes most of a tenant's traffic.
- **Documents per request**: log-normal (sigma 1.0), rounded and clipped to 1..1000;
  its median is solved so the mean is 155.1 = 3.8B / 24.5M (`documents_mu`). Queries are
  1 for 97 % of requests, 2-4 otherwise. Input tokens = query tokens + documents x a
  per-request average document length (log-normal around 230 tokens, clipped 100-500);
  a reranker generates nothing, so output tokens are 0.
- **Latency**: log-normal (sigma 0.3) around the provider's typical value, times
  `0.6 + 0.4 * sqrt(documents / 100)` (cross-encoder cost grows with the candidate set)
  and +60 % per extra query, so each provider's p50 sits near the page's figure.
- **Failures**: 0.4-1 % of requests fail (`error_type` timeout 504 / rate_limited 429 /
  provider_5xx 500-503); 2 % of successful requests carry 1-2 `fallbacks` (failed
  attempts on other providers before the one that served), and 30 % of failed ones one.
  The end-to-end latency includes the failed attempts.
- **Probes**: one per provider every 30 s of simulated time; failures come in short runs
  (outages, mean 3 probes) whose rate keeps each provider's long-run uptime at its
  modelled value, so the platform average is ~99.92 %.

Backfill writes at engine speed, not through HTTP: numpy draws the model's numeric
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

import argparse
import math
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from clickhouse_connect.driver.client import Client
from sqlalchemy import Engine

from metering.ingest.structs import MAX_AGE, MAX_FUTURE
from metering.settings import Settings
from metering.tenants.registration import register_pairs

if TYPE_CHECKING:
    from metering.services import Services

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]

# ---------------------------------------------------------------------------------------
# The traffic model: constants and pure functions of (parameters, RNG).

SEED_MONTH_EVENTS = 24_500_000
SEED_MONTH_TENANTS = 210_000
SEED_MONTH_DAYS = 30
CHUNK_ROWS = 1 << 20
PROBE_INTERVAL_MS = 30_000
REGISTER_BATCH = 20_000  # pairs per register_pairs call (one transaction each)


@dataclass(frozen=True)
class ProviderModel:
    name: str
    region: str
    typical_latency_ms: float
    uptime: float
    share: float
    error_rate: float


PROVIDERS: tuple[ProviderModel, ...] = (
    ProviderModel("llmapi", "global", 80.0, 0.99995, 0.55, 0.004),
    ProviderModel("cohere", "global", 160.0, 0.999, 0.20, 0.008),
    ProviderModel("azure", "us-east", 140.0, 0.999, 0.15, 0.008),
    ProviderModel("bedrock", "us-west", 170.0, 0.999, 0.10, 0.010),
)
MODELS: tuple[str, ...] = ("rerank-4-pro", "rerank-3.5")
MODEL_SHARES: tuple[float, ...] = (0.88, 0.12)
MODEL_LATENCY: tuple[float, ...] = (1.0, 0.85)
# Index 0 = no error; the rest are the contract's examples.
ERROR_TYPES: tuple[str, ...] = ("", "timeout", "rate_limited", "provider_5xx")
ERROR_TYPE_SHARES: tuple[float, ...] = (0.2, 0.4, 0.4)  # of failed requests
FALLBACK_ERROR_SHARES: tuple[float, ...] = (0.2, 0.3, 0.5)  # of failed attempts
TIMEOUT_MS = 5_000.0  # the gateway gives up on a request after this
FALLBACK_TIMEOUT_MS = 2_000.0  # ... and on an attempt it can still fall back from

DAILY_PEAK_HOUR_UTC = 13.0
DAILY_AMPLITUDE = 0.5  # (1 + a) / (1 - a) = 3: peak/trough ratio
WEEKEND_FACTOR = 0.8

ZIPF_EXPONENT = 1.0
ZIPF_OFFSET = 3.0
PROJECT_COUNT_SHARES: tuple[float, ...] = (0.45, 0.25, 0.15, 0.10, 0.05)  # 1..5 projects

DOCUMENTS_MEAN = 3.8e9 / 24.5e6  # 155.1: the page's documents / requests
DOCUMENTS_SIGMA = 1.0
DOCUMENTS_MAX = 1000
MULTI_QUERY_SHARE = 0.03
DOC_TOKENS_MEDIAN = 230.0
DOC_TOKENS_SIGMA = 0.35
DOC_TOKENS_RANGE = (100.0, 500.0)
QUERY_TOKENS_RANGE = (6, 48)
LATENCY_SIGMA = 0.3
FALLBACK_SHARE_OK = 0.02
FALLBACK_SHARE_ERROR = 0.3
TWO_FALLBACKS_SHARE = 0.2
OUTAGE_MEAN_PROBES = 3.0


def document_latency_factor(documents: npt.NDArray[Any]) -> F64:
    """Latency multiplier for a request of `documents` candidates (1.0 at 100)."""
    return np.asarray(0.6 + 0.4 * np.sqrt(np.asarray(documents, dtype=np.float64) / 100.0))


@lru_cache(maxsize=8)
def documents_mu(mean: float = DOCUMENTS_MEAN, sigma: float = DOCUMENTS_SIGMA) -> float:
    """The log-normal location whose rounded, clipped (1..DOCUMENTS_MAX) draws have `mean`.

    Exact: sums k * P(round(X) = k) over the integers with the normal CDF, then bisects.
    """
    edges = np.log(np.arange(1, DOCUMENTS_MAX, dtype=np.float64) + 0.5)  # 1.5 .. 999.5
    values = np.arange(1, DOCUMENTS_MAX + 1, dtype=np.float64)
    erf = np.vectorize(math.erf)

    def clipped_mean(mu: float) -> float:
        cdf = 0.5 * (1.0 + erf((edges - mu) / (sigma * math.sqrt(2.0))))
        probs = np.diff(np.concatenate(([0.0], cdf, [1.0])))
        return float(np.dot(probs, values))

    lo, hi = 0.0, math.log(DOCUMENTS_MAX)
    for _ in range(60):
        mid = (lo + hi) / 2
        if clipped_mean(mid) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def minute_weights(start_ms: int, end_ms: int) -> tuple[I64, F64]:
    """Per-minute bins of [start, end): (bin start ms, relative load).

    Load = daily cycle (cosine, peak at DAILY_PEAK_HOUR_UTC) x weekend dip, times the
    bin's length (the last bin may be partial).
    """
    if end_ms <= start_ms:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    bins = np.arange(start_ms, end_ms, 60_000, dtype=np.int64)
    lengths = np.minimum(bins + 60_000, end_ms) - bins
    mid = bins + lengths // 2
    hour = (mid % 86_400_000) / 3_600_000.0
    weekday = (mid // 86_400_000 + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    daily = 1.0 + DAILY_AMPLITUDE * np.cos(2 * np.pi * (hour - DAILY_PEAK_HOUR_UTC) / 24.0)
    weekly = np.where(weekday >= 5, WEEKEND_FACTOR, 1.0)
    return bins, daily * weekly * (lengths / 60_000.0)


@dataclass(frozen=True)
class TenantTable:
    """Tenants by size rank (0 = largest): who they are and how traffic picks them."""

    cdf: F64  # cumulative traffic share by rank
    number: U32  # the tenant's number in its id (`acct-<number>`), a random permutation
    projects: U8  # 1..5 projects per tenant
    project_offset: I64  # global index of the tenant's first project
    width: int  # digits in tenant ids

    @property
    def size(self) -> int:
        return len(self.cdf)

    @property
    def total_projects(self) -> int:
        return int(self.project_offset[-1] + self.projects[-1]) if self.size else 0

    def tenant_id(self, number: int) -> str:
        return f"acct-{number:0{self.width}d}"

    def project_id(self, number: int, project: int) -> str:
        return f"proj-{number:0{self.width}d}-{project}"

    def api_key_id(self, number: int, project: int) -> str:
        return f"key-{number:0{self.width}d}-{project}"

    def pairs(self, used: npt.NDArray[np.bool_]) -> list[tuple[str, str]]:
        """(tenant_id, project_id) of every global project index flagged in `used`."""
        index = np.flatnonzero(used)
        rank = np.searchsorted(self.project_offset, index, side="right") - 1
        project = index - self.project_offset[rank] + 1
        return [
            (self.tenant_id(int(n)), self.project_id(int(n), int(p)))
            for n, p in zip(self.number[rank], project, strict=True)
        ]


def make_tenants(count: int, seed: int) -> TenantTable:
    """`count` tenants with Zipf-Mandelbrot traffic weights and 1-5 projects each."""
    if count < 1:
        raise ValueError("tenants: must be >= 1")
    rng = np.random.default_rng([seed, 0])
    weights = (np.arange(count, dtype=np.float64) + ZIPF_OFFSET) ** -ZIPF_EXPONENT
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    number = (rng.permutation(count) + 1).astype(np.uint32)
    projects = (rng.choice(5, size=count, p=PROJECT_COUNT_SHARES) + 1).astype(np.uint8)
    # The biggest 1 % run several products: at least 3 projects.
    top = max(1, count // 100)
    projects[:top] = np.maximum(projects[:top], 3)
    offset = np.concatenate(([0], np.cumsum(projects[:-1], dtype=np.int64))).astype(np.int64)
    return TenantTable(cdf, number, projects, offset, max(6, len(str(count))))


@dataclass
class EventColumns:
    """The model's draw for n events, as numbers (names are formatted later)."""

    timestamp_ms: I64
    tenant: U32  # tenant number
    project: U8  # 1-based project of the tenant
    project_index: I64  # global project index (for registration)
    provider: U8  # index into PROVIDERS
    model: U8  # index into MODELS
    error: U8  # 0 = ok, else index into ERROR_TYPES
    http_status: U16
    queries: U16
    documents: U32
    input_tokens: U64
    latency_ms: F64
    fallbacks: U8  # 0..2
    fb_provider: tuple[U8, U8]
    fb_error: tuple[U8, U8]
    fb_http_status: tuple[U16, U16]
    fb_latency_ms: tuple[F64, F64]

    def __len__(self) -> int:
        return len(self.timestamp_ms)


def _pick(rng: np.random.Generator, shares: Sequence[float], n: int) -> U8:
    cdf = np.cumsum(np.asarray(shares, dtype=np.float64))
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1).astype(
        np.uint8
    )


def _failed_attempt(
    rng: np.random.Generator, provider: U8, documents: U32, shares: Sequence[float], timeout: float
) -> tuple[U8, U16, F64]:
    """(error index, http status, latency) of failed attempts on `provider`."""
    n = len(provider)
    error = _pick(rng, shares, n) + 1
    typical = np.array([p.typical_latency_ms for p in PROVIDERS])[provider]
    jitter = rng.lognormal(0.0, LATENCY_SIGMA, n)
    latency = np.select(
        [error == 1, error == 2],
        [timeout + rng.random(n) * 50.0, rng.lognormal(np.log(15.0), 0.5, n)],
        0.5 * typical * document_latency_factor(documents) * jitter,
    )
    http = np.select(
        [error == 1, error == 2],
        [np.full(n, 504), np.full(n, 429)],
        rng.choice(np.array([500, 502, 503]), size=n, p=[0.5, 0.3, 0.2]),
    ).astype(np.uint16)
    return error.astype(np.uint8), http, np.round(latency, 3)


def draw_senders(
    rng: np.random.Generator, tenants: TenantTable, n: int
) -> tuple[npt.NDArray[np.intp], U8]:
    """(tenant rank, 1-based project) of n requests: heavy-tailed tenants, and within a
    tenant a skew towards its first project."""
    rank = np.minimum(np.searchsorted(tenants.cdf, rng.random(n), side="right"), tenants.size - 1)
    count = tenants.projects[rank]
    project = (np.floor(count * rng.random(n) ** 2) + 1).astype(np.uint8)
    return rank, project


def generate_events(
    rng: np.random.Generator,
    tenants: TenantTable,
    timestamp_ms: I64,
    senders: tuple[npt.NDArray[np.intp], U8] | None = None,
) -> EventColumns:
    """Draw one event per timestamp from the traffic model (`senders`: drawn already)."""
    n = len(timestamp_ms)
    rank, project = senders if senders is not None else draw_senders(rng, tenants, n)
    project_index = tenants.project_offset[rank] + project - 1

    provider = _pick(rng, [p.share for p in PROVIDERS], n)
    model = _pick(rng, MODEL_SHARES, n)
    documents = np.clip(
        np.rint(rng.lognormal(documents_mu(), DOCUMENTS_SIGMA, n)), 1, DOCUMENTS_MAX
    ).astype(np.uint32)
    multi = rng.random(n) < MULTI_QUERY_SHARE
    queries = np.where(multi, rng.integers(2, 5, n), 1).astype(np.uint16)
    query_tokens = rng.integers(QUERY_TOKENS_RANGE[0], QUERY_TOKENS_RANGE[1] + 1, n)
    doc_tokens = np.clip(
        rng.lognormal(np.log(DOC_TOKENS_MEDIAN), DOC_TOKENS_SIGMA, n), *DOC_TOKENS_RANGE
    )
    input_tokens = (queries * query_tokens + np.rint(documents * doc_tokens)).astype(np.uint64)

    typical = np.array([p.typical_latency_ms for p in PROVIDERS])[provider]
    latency = (
        typical
        * np.array(MODEL_LATENCY)[model]
        * document_latency_factor(documents)
        * (1.0 + 0.6 * (queries - 1))
        * rng.lognormal(0.0, LATENCY_SIGMA, n)
    )
    failed = rng.random(n) < np.array([p.error_rate for p in PROVIDERS])[provider]
    error = np.zeros(n, dtype=np.uint8)
    http_status = np.full(n, 200, dtype=np.uint16)
    rows = np.flatnonzero(failed)
    error[rows], http_status[rows], latency[rows] = _failed_attempt(
        rng, provider[rows], documents[rows], ERROR_TYPE_SHARES, TIMEOUT_MS
    )

    share = np.where(failed, FALLBACK_SHARE_ERROR, FALLBACK_SHARE_OK)
    has_fallback = rng.random(n) < share
    two = has_fallback & ~failed & (rng.random(n) < TWO_FALLBACKS_SHARE)
    fallbacks = (has_fallback.astype(np.uint8) + two).astype(np.uint8)
    # Failed attempts on distinct other providers: offsets o1 in {1,2,3}, o2 != o1.
    fb_provider = (np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8))
    fb_error = (np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8))
    fb_http = (np.zeros(n, dtype=np.uint16), np.zeros(n, dtype=np.uint16))
    fb_latency = (np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.float64))
    rows = np.flatnonzero(has_fallback)
    o1 = rng.integers(1, 4, len(rows))
    o2 = 1 + (o1 + rng.integers(0, 2, len(rows))) % 3
    for k, (offset, rows_k) in enumerate(((o1, rows), (o2[two[rows]], np.flatnonzero(two)))):
        other = ((provider[rows_k] + offset) % len(PROVIDERS)).astype(np.uint8)
        fb_provider[k][rows_k] = other
        fb_error[k][rows_k], fb_http[k][rows_k], fb_latency[k][rows_k] = _failed_attempt(
            rng, other, documents[rows_k], FALLBACK_ERROR_SHARES, FALLBACK_TIMEOUT_MS
        )
    latency = latency + fb_latency[0] + fb_latency[1]
    return EventColumns(
        timestamp_ms=np.asarray(timestamp_ms, dtype=np.int64),
        tenant=tenants.number[rank],
        project=project,
        project_index=project_index.astype(np.int64),
        provider=provider,
        model=model,
        error=error,
        http_status=http_status,
        queries=queries,
        documents=documents,
        input_tokens=input_tokens,
        latency_ms=np.round(latency, 3),
        fallbacks=fallbacks,
        fb_provider=fb_provider,
        fb_error=fb_error,
        fb_http_status=fb_http,
        fb_latency_ms=fb_latency,
    )


@dataclass
class ProbeColumns:
    timestamp_ms: I64
    provider: U8
    ok: npt.NDArray[np.bool_]
    latency_ms: F64
    http_status: U16
    timed_out: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.timestamp_ms)


def outage_mask(rng: np.random.Generator, n: int, uptime: float) -> npt.NDArray[np.bool_]:
    """True where a probe fails: runs of mean OUTAGE_MEAN_PROBES, long-run rate 1 - uptime."""
    down = np.zeros(n, dtype=bool)
    starts = np.flatnonzero(rng.random(n) < (1.0 - uptime) / OUTAGE_MEAN_PROBES)
    lengths = rng.geometric(1.0 / OUTAGE_MEAN_PROBES, len(starts))
    for start, length in zip(starts, lengths, strict=True):
        down[start : start + length] = True
    return down


def generate_probes(rng: np.random.Generator, start_ms: int, end_ms: int) -> ProbeColumns:
    """One probe per provider every 30 s of [start, end), providers staggered by 7.5 s."""
    parts: list[ProbeColumns] = []
    for index, spec in enumerate(PROVIDERS):
        first = start_ms + index * PROBE_INTERVAL_MS // len(PROVIDERS)
        times = np.arange(first, end_ms, PROBE_INTERVAL_MS, dtype=np.int64)
        n = len(times)
        times = np.minimum(times + rng.integers(0, 1000, n), end_ms - 1)
        down = outage_mask(rng, n, spec.uptime)
        timed_out = down & (rng.random(n) < 0.4)
        latency = (
            spec.typical_latency_ms
            * document_latency_factor(np.ones(n))
            * rng.lognormal(0.0, 0.2, n)
        )
        latency = np.where(timed_out, TIMEOUT_MS, np.where(down, latency * 0.3, latency))
        http = np.where(down, np.where(timed_out, 0, 503), 200).astype(np.uint16)
        parts.append(
            ProbeColumns(
                times,
                np.full(n, index, dtype=np.uint8),
                ~down,
                np.round(latency, 3),
                http,
                timed_out,
            )
        )
    return ProbeColumns(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("timestamp_ms", "provider", "ok", "latency_ms", "http_status", "timed_out")
        )
    )


# ---------------------------------------------------------------------------------------
# Contract JSON (live mode, tests).


def _iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def event_dicts(
    cols: EventColumns, tenants: TenantTable, ids: Sequence[str]
) -> list[dict[str, Any]]:
    """The events as contract JSON objects (what the gateway would send)."""
    out: list[dict[str, Any]] = []
    lists = {
        name: getattr(cols, name).tolist()
        for name in (
            "timestamp_ms",
            "tenant",
            "project",
            "provider",
            "model",
            "error",
            "http_status",
            "queries",
            "documents",
            "input_tokens",
            "latency_ms",
            "fallbacks",
        )
    }
    fb = [
        (
            cols.fb_provider[i].tolist(),
            cols.fb_error[i].tolist(),
            cols.fb_http_status[i].tolist(),
            cols.fb_latency_ms[i].tolist(),
        )
        for i in range(2)
    ]
    for i, event_id in enumerate(ids):
        tenant, project = lists["tenant"][i], lists["project"][i]
        provider = PROVIDERS[lists["provider"][i]]
        model = MODELS[lists["model"][i]]
        error = lists["error"][i]
        event: dict[str, Any] = {
            "event_id": event_id,
            "timestamp": _iso(lists["timestamp_ms"][i]),
            "tenant_id": tenants.tenant_id(tenant),
            "project_id": tenants.project_id(tenant, project),
            "api_key_id": tenants.api_key_id(tenant, project),
            "provider": provider.name,
            "model": model,
            "region": provider.region,
            "status": "error" if error else "ok",
            "http_status": lists["http_status"][i],
            "queries": lists["queries"][i],
            "documents": lists["documents"][i],
            "input_tokens": lists["input_tokens"][i],
            "output_tokens": 0,
            "latency_ms": lists["latency_ms"][i],
            "fallbacks": [],
        }
        if error:
            event["error_type"] = ERROR_TYPES[error]
        for k in range(lists["fallbacks"][i]):
            fb_provider = PROVIDERS[fb[k][0][i]]
            event["fallbacks"].append(
                {
                    "provider": fb_provider.name,
                    "model": model,
                    "region": fb_provider.region,
                    "latency_ms": fb[k][3][i],
                    "error_type": ERROR_TYPES[fb[k][1][i]],
                    "http_status": fb[k][2][i],
                }
            )
        out.append(event)
    return out


def probe_dicts(cols: ProbeColumns, ids: Sequence[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, probe_id in enumerate(ids):
        spec = PROVIDERS[int(cols.provider[i])]
        probe: dict[str, Any] = {
            "probe_id": probe_id,
            "timestamp": _iso(int(cols.timestamp_ms[i])),
            "provider": spec.name,
            "region": spec.region,
            "ok": bool(cols.ok[i]),
            "latency_ms": float(cols.latency_ms[i]),
        }
        if cols.http_status[i]:
            probe["http_status"] = int(cols.http_status[i])
        if not cols.ok[i]:
            probe["error"] = "timeout" if cols.timed_out[i] else "HTTP 503"
        out.append(probe)
    return out


# ---------------------------------------------------------------------------------------
# Backfill: straight into ClickHouse.

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
COUNT_EVENTS = "SELECT count() FROM rerank_events"

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
        timings = dict.fromkeys(("generate", "stage", "events", "ids", "probes", "register"), 0.0)
        names = [name for name, _ in STAGE_COLUMNS]
        starts = list(range(0, plan.events, CHUNK_ROWS))
        # Who sends what is drawn first (a cheap pass of its own RNG stream), so that the
        # registration of tenants and projects, which is slow (register_pairs: ~75 us a
        # row in SQLite, ~50 s for a seed month's 630K), runs from the start in its own
        # thread, while another thread draws chunk k+1 and ClickHouse stores chunk k
        # (chDB releases the GIL while it works).
        used = self.used_projects()
        pairs = self.tenants.pairs(used)
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


# ---------------------------------------------------------------------------------------
# Demo data for `metering serve --demo`.

DEMO_EVENTS = 2_000_000
DEMO_TENANTS = 2_000
DEMO_SEED = 0
DEMO_PREFIX = "demo"


def demo_hook(services: Services) -> None:
    """Fill an empty store with 30 days of demo traffic ending now; otherwise do nothing."""
    if int(services.ch.query(COUNT_EVENTS).result_rows[0][0]):
        return
    plan = BackfillPlan(
        days=30,
        events=DEMO_EVENTS,
        tenants=DEMO_TENANTS,
        seed=DEMO_SEED,
        end=datetime.now(UTC),
        id_prefix=DEMO_PREFIX,
    )
    # A client of its own: the shared one serializes its calls, and /readyz must not
    # wait behind seconds of inserts.
    from metering.clickhouse.client import make_client

    settings = services.settings
    ch = make_client(settings.resolved_clickhouse_url, settings.clickhouse_database)
    try:
        report = backfill(ch, services.engine, plan)
    finally:
        ch.close()
    # The gates' Bloom filters were built before these ids existed.
    services.events.gate.rebuild(services.events.store.count_ids())
    services.probes.gate.rebuild(services.probes.store.count_ids())
    print(
        f"metering: demo data: {report.events:,} events, {report.probes:,} probes, "
        f"{report.tenants:,} tenants over 30 days ({report.seconds:.1f} s)",
        flush=True,
    )


# ---------------------------------------------------------------------------------------
# Live: real-time traffic through the gateway client.


class _Sender(Protocol):
    def send_many(self, events: Any) -> None: ...
    def send_probe(self, probe: Any) -> None: ...
    def flush(self, timeout: float | None = None) -> bool: ...
    def close(self, timeout: float | None = None) -> bool: ...
    def stats(self) -> dict[str, int]: ...


@dataclass
class LiveReport:
    generated_events: int
    generated_probes: int
    seconds: float
    stats: dict[str, int]


def live(
    sender: _Sender,
    *,
    rate: float,
    duration: float,
    seed: int,
    tenants: int,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    stop: threading.Event | None = None,
    tick: float = 0.1,
) -> LiveReport:
    """Send `rate` events/s (timestamps = now) and the probes for `duration` seconds."""
    table = make_tenants(tenants, seed)
    rng = np.random.default_rng([seed, 4])
    run = f"live-{seed}-{int(clock() * 1000)}"
    began = clock()
    sent = probes = 0
    next_probe = [began] * len(PROVIDERS)  # all providers at once, then every 30 s
    try:
        while stop is None or not stop.is_set():
            now = clock()
            elapsed = min(now - began, duration)
            due = int(rate * elapsed) - sent
            if due > 0:
                now_ms = int(now * 1000)
                spread = rng.integers(0, int(tick * 1000) + 1, due)
                times = np.full(due, now_ms, dtype=np.int64) - spread
                cols = generate_events(rng, table, times)
                ids = [f"{run}-{i}" for i in range(sent, sent + due)]
                sender.send_many(event_dicts(cols, table, ids))
                sent += due
            for index, spec in enumerate(PROVIDERS):
                if now >= next_probe[index]:
                    ok = bool(rng.random() < spec.uptime)
                    latency = spec.typical_latency_ms * 0.64 * float(rng.lognormal(0.0, 0.2))
                    probe: dict[str, Any] = {
                        "probe_id": f"{run}-probe-{probes}",
                        "timestamp": _iso(int(now * 1000)),
                        "provider": spec.name,
                        "region": spec.region,
                        "ok": ok,
                        "latency_ms": round(latency, 3),
                        "http_status": 200 if ok else 503,
                    }
                    if not ok:
                        probe["error"] = "HTTP 503"
                    sender.send_probe(probe)
                    probes += 1
                    next_probe[index] += PROBE_INTERVAL_MS / 1000
            if elapsed >= duration:
                break
            sleep(max(0.0, min(tick, duration - (clock() - began))))
    except KeyboardInterrupt:  # Ctrl-C ends the run early; the summary still prints
        pass
    sender.flush(timeout=30.0)
    return LiveReport(sent, probes, clock() - began, sender.stats())


# ---------------------------------------------------------------------------------------
# CLI.


def _iso_arg(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`metering simulate backfill|live ...`"""
    modes = parser.add_subparsers(dest="simulate_mode", required=True)
    fill = modes.add_parser(
        "backfill",
        help="write N days of simulated traffic straight into the stores",
        description="Write N days of simulated traffic (events, probes, tenants) straight "
        "into ClickHouse and the relational store, at engine speed. Refuses to run again "
        "with the same --seed (ids sim-<seed>-<n> are already stored).",
    )
    fill.add_argument("--days", type=float, required=True, help="length of the window")
    fill.add_argument(
        "--events",
        type=int,
        default=None,
        help=f"events in the window (default {SEED_MONTH_EVENTS:,} per "
        f"{SEED_MONTH_DAYS} days, the seed page's figure)",
    )
    fill.add_argument(
        "--tenants",
        type=int,
        default=SEED_MONTH_TENANTS,
        help="developer accounts (default %(default)s)",
    )
    fill.add_argument("--seed", type=int, default=1, help="RNG seed and id prefix (default 1)")
    fill.add_argument(
        "--end",
        type=_iso_arg,
        default=None,
        help="end of the window, ISO 8601 (default now; naive = UTC)",
    )
    run = modes.add_parser(
        "live",
        help="send simulated traffic in real time through the HTTP API",
        description="Generate events in real time (timestamps = now) and send them with "
        "the gateway client (metering.client.MeteringClient), plus provider probes.",
    )
    run.add_argument("--url", default="http://127.0.0.1:8000")
    run.add_argument("--key", required=True, help="an API key with the ingest scope")
    run.add_argument("--rate", type=float, required=True, help="events per second")
    run.add_argument("--duration", type=float, required=True, help="seconds to run")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument(
        "--tenants", type=int, default=DEMO_TENANTS, help="developer accounts (default %(default)s)"
    )


def main(args: argparse.Namespace, settings: Settings) -> int:
    if args.simulate_mode == "backfill":
        return _backfill_command(args, settings)
    if args.simulate_mode == "live":
        return _live_command(args)
    return 2


def _backfill_command(args: argparse.Namespace, settings: Settings) -> int:
    from metering.clickhouse import migrations as ch_migrations
    from metering.clickhouse.client import make_client
    from metering.datadir import lock_or_explain
    from metering.db import migrations as relational_migrations
    from metering.db.engine import make_engine

    events = args.events
    if events is None:
        events = round(SEED_MONTH_EVENTS * args.days / SEED_MONTH_DAYS)
    plan = BackfillPlan(
        days=args.days,
        events=events,
        tenants=args.tenants,
        seed=args.seed,
        end=args.end or datetime.now(UTC),
    )
    try:
        plan.validate(datetime.now(UTC))
    except BackfillError as exc:
        print(f"metering simulate: {exc}", file=sys.stderr)
        return 2
    lock = None
    if settings.uses_chdb:
        lock = lock_or_explain(settings.data_dir)
        if lock is None:
            return 1
    try:
        engine = make_engine(settings.resolved_database_url)
        ch = make_client(settings.resolved_clickhouse_url, settings.clickhouse_database)
        relational_migrations.upgrade(engine)
        ch_migrations.migrate(ch)
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            elapsed = time.perf_counter() - started
            print(
                f"  {done:,}/{total:,} events ({done / elapsed:,.0f}/s)",
                file=sys.stderr,
                flush=True,
            )

        try:
            report = backfill(ch, engine, plan, progress=progress)
        except BackfillError as exc:
            print(f"metering simulate: {exc}", file=sys.stderr)
            return 1
        finally:
            engine.dispose()
        start = datetime.fromtimestamp(plan.start_ms / 1000, UTC)
        print(
            f"backfill {plan.prefix}: {report.events:,} events, {report.probes:,} probes, "
            f"{report.tenants:,} tenants / {report.projects:,} projects, "
            f"{start:%Y-%m-%d %H:%M:%S} .. {plan.end.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC, "
            f"{report.seconds:.1f} s "
            f"({report.rows_per_second:,.0f} events/s)"
        )
        if not settings.uses_chdb:
            print(
                "note: restart any running `metering serve` on this ClickHouse so that its "
                "dedup gate learns the new ids"
            )
        return 0
    finally:
        if lock is not None:
            lock.release()


def _live_command(args: argparse.Namespace) -> int:
    from metering.client import MeteringClient

    if args.rate <= 0 or args.duration <= 0 or args.tenants < 1:
        print(
            "metering simulate: --rate and --duration must be > 0, --tenants >= 1", file=sys.stderr
        )
        return 2
    sender = MeteringClient(args.url, args.key, max_batch=1000, flush_interval=1.0)
    try:
        report = live(
            sender, rate=args.rate, duration=args.duration, seed=args.seed, tenants=args.tenants
        )
    except KeyboardInterrupt:
        sender.close(timeout=10.0)
        print("metering simulate: interrupted", file=sys.stderr)
        return 130
    sender.close(timeout=30.0)
    stats = sender.stats()
    print(
        f"live: {report.generated_events:,} events and {report.generated_probes:,} probes in "
        f"{report.seconds:.1f} s; sent {stats.get('sent', 0):,}, "
        f"accepted {stats.get('accepted', 0):,}, duplicates {stats.get('duplicates', 0):,}, "
        f"rejected {stats.get('rejected', 0):,}, dead-lettered "
        f"{stats.get('dead_lettered', 0):,}, pending {stats.get('pending', 0):,}"
    )
    return 0 if not stats.get("rejected") and not stats.get("dead_lettered") else 1
