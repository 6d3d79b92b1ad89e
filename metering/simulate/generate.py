"""Events and probes drawn from the traffic model, as numpy columns (names are formatted
later: in ClickHouse by the backfill, in Python by `event_dicts` for live mode and tests),
and their contract JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from metering.simulate.model import (
    DOC_TOKENS_MEDIAN,
    DOC_TOKENS_RANGE,
    DOC_TOKENS_SIGMA,
    DOCUMENTS_MAX,
    DOCUMENTS_SIGMA,
    ERROR_TYPE_SHARES,
    ERROR_TYPES,
    F64,
    FALLBACK_ERROR_SHARES,
    FALLBACK_SHARE_ERROR,
    FALLBACK_SHARE_OK,
    FALLBACK_TIMEOUT_MS,
    I64,
    LATENCY_SIGMA,
    MODEL_LATENCY,
    MODEL_SHARES,
    MODELS,
    MULTI_QUERY_SHARE,
    OUTAGE_MEAN_PROBES,
    PROBE_INTERVAL_MS,
    PROVIDERS,
    QUERY_TOKENS_RANGE,
    TIMEOUT_MS,
    TWO_FALLBACKS_SHARE,
    U8,
    U16,
    U32,
    U64,
    TenantTable,
    document_latency_factor,
    documents_mu,
    draw_senders,
)


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


def iso_timestamp(ms: int) -> str:
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
            "timestamp": iso_timestamp(lists["timestamp_ms"][i]),
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
            "timestamp": iso_timestamp(int(cols.timestamp_ms[i])),
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
