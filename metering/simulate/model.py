"""The traffic model: constants and pure functions of (parameters, RNG).

Why the model looks as it does
------------------------------
The dashboard, the provider table and the invoices are only convincing over data with
the shape of the real thing, so the traffic model reproduces the seed page's figures
(30 days: 24.5M requests, 3.8B documents, 210K active accounts, 99.9x% uptime, and the
provider comparison table) with the distributions such traffic has in practice:

- **Providers** (`PROVIDERS`): llmapi / cohere / azure / bedrock with the page's regions,
  typical latencies and uptimes; traffic shares 55/20/15/10 % (the gateway routes most
  traffic to its cheapest, fastest provider). Mostly `rerank-4-pro`, some `rerank-3`
  (both in the default price book).
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]


SEED_MONTH_EVENTS = 24_500_000
SEED_MONTH_TENANTS = 210_000
SEED_MONTH_DAYS = 30
PROBE_INTERVAL_MS = 30_000


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
MODELS: tuple[str, ...] = ("rerank-4-pro", "rerank-3")
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


def draw_senders(
    rng: np.random.Generator, tenants: TenantTable, n: int
) -> tuple[npt.NDArray[np.intp], U8]:
    """(tenant rank, 1-based project) of n requests: heavy-tailed tenants, and within a
    tenant a skew towards its first project."""
    rank = np.minimum(np.searchsorted(tenants.cdf, rng.random(n), side="right"), tenants.size - 1)
    count = tenants.projects[rank]
    project = (np.floor(count * rng.random(n) ** 2) + 1).astype(np.uint8)
    return rank, project
