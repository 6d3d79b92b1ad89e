"""The raw-table side of bench/analytics.py: each question of the read endpoints asked as
plain SQL over `rerank_events` (and `uptime_probes`), with projections off, timed K times.

Runs as its own process (`python -m bench.analytics_raw --data-dir D --job J --params P`)
while no server holds the data dir: chDB allows one data path per process and one process
per path. Prints one JSON object on stdout: the timings (ms) and the answer, which the
parent compares with the endpoint's.

Every raw query carries `SETTINGS optimize_use_projections = 0`, so ClickHouse reads the
rows, never the aggregate projections the endpoints use. Values are bound as parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NO_PROJECTIONS = " SETTINGS optimize_use_projections = 0"
_WINDOW = (
    "timestamp >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')"
    " AND timestamp < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')"
)
_OK = "status = 'ok'"

# The data the bench runs on: its size, its time range, and its busiest tenant.
PREPARE = (
    "SELECT count(), toUnixTimestamp64Milli(min(timestamp)),"
    " toUnixTimestamp64Milli(max(timestamp)),"
    " uniqExact(tenant_id), (SELECT count() FROM uptime_probes) FROM rerank_events"
)
BUSIEST = (
    "SELECT tenant_id, count() AS c FROM rerank_events GROUP BY tenant_id ORDER BY c DESC LIMIT 1"
)

# /v1/stats: one scan for the counts, sums and exact distinct accounts (probes are a
# separate, small table).
STATS = (
    "SELECT count(), countIf(status = 'error'), sumIf(documents, " + _OK + "),"
    " sumIf(toUInt128(queries) * documents, " + _OK + "),"
    " sumIf(toUInt128(input_tokens), " + _OK + "), sumIf(toUInt128(output_tokens), " + _OK + "),"
    " uniqExact(tenant_id),"
    " (SELECT countIf(ok) FROM uptime_probes WHERE " + _WINDOW + "),"
    " (SELECT count() FROM uptime_probes WHERE " + _WINDOW + ")"
    " FROM rerank_events WHERE " + _WINDOW + NO_PROJECTIONS
)
STATS_FIGURES = (
    "requests",
    "errors",
    "documents_reranked",
    "doc_query_pairs",
    "input_tokens",
    "output_tokens",
    "active_accounts",
)
# Spend (not timed: a check only): billable sums per (provider, model) and the latest
# price boundary before each event, so that one price applies to each group.
_SINCE = "arrayLast(b -> b <= timestamp, {bounds:Array(DateTime64(3, 'UTC'))})"
SPEND = (
    "SELECT provider, model, toUnixTimestamp64Milli(" + _SINCE + ") AS since,"
    " sum(toUInt128(input_tokens)), sum(toUInt128(output_tokens)),"
    " sum(toUInt128(queries) * documents)"
    " FROM rerank_events WHERE "
    + _WINDOW
    + " AND "
    + _OK
    + " GROUP BY provider, model, since"
    + NO_PROJECTIONS
)
# /v1/usage?tenant_id=&granularity=day: per day, with what pricing needs.
USAGE = (
    "SELECT toUnixTimestamp(toStartOfDay(timestamp)) AS bucket, provider, model,"
    " toUnixTimestamp64Milli(" + _SINCE + ") AS since,"
    " count(), countIf(status = 'error'), sumIf(documents, " + _OK + "),"
    " sumIf(toUInt128(queries) * documents, " + _OK + "),"
    " sumIf(toUInt128(input_tokens), " + _OK + "), sumIf(toUInt128(output_tokens), " + _OK + ")"
    " FROM rerank_events WHERE tenant_id = {tenant_id:String} AND "
    + _WINDOW
    + " GROUP BY bucket, provider, model, since"
    + NO_PROJECTIONS
)
# /v1/providers: every attempt (the serving provider, then each failed fallback) as one
# row, then per provider the counts, latency over ok served requests (DDSketch, as the
# endpoint), the most attempts in one UTC second, and the probes' uptime.
_ATTEMPTS = (
    " FROM rerank_events ARRAY JOIN arrayConcat([provider], fallbacks.provider) AS p,"
    " arrayConcat([toUInt8(status = 'error')], arrayWithConstant(length(fallbacks), toUInt8(1)))"
    " AS err WHERE " + _WINDOW
)
PROVIDERS = (
    "SELECT f.p, f.requests, f.errors, f.ok_requests, f.latency_sum, f.q, s.peak,"
    " u.ok_probes, u.probes FROM"
    " (SELECT p, count() AS requests, sum(err) AS errors, countIf(err = 0) AS ok_requests,"
    " sumIf(latency_ms, err = 0) AS latency_sum,"
    " quantilesDDIf(0.01, 0.5, 0.95, 0.99)(latency_ms, err = 0) AS q"
    + _ATTEMPTS
    + " GROUP BY p) AS f"
    " LEFT JOIN (SELECT p, max(c) AS peak FROM (SELECT toStartOfSecond(timestamp) AS sec, p,"
    " count() AS c" + _ATTEMPTS + " GROUP BY sec, p) GROUP BY p) AS s ON s.p = f.p"
    " LEFT JOIN (SELECT toString(provider) AS p, countIf(ok) AS ok_probes, count() AS probes"
    " FROM uptime_probes WHERE " + _WINDOW + " GROUP BY p) AS u ON u.p = f.p" + NO_PROJECTIONS
)
# /v1/requests first page: the newest events of the window.
_REQUEST_COLUMNS = (
    "event_id, toUnixTimestamp64Milli(timestamp), tenant_id, project_id, api_key_id, provider,"
    " model, region, status, http_status, error_type, queries, documents, input_tokens,"
    " output_tokens, latency_ms, fallbacks"
)
REQUESTS = (
    "SELECT "
    + _REQUEST_COLUMNS
    + " FROM rerank_events WHERE "
    + _WINDOW
    + " ORDER BY timestamp DESC, event_id DESC LIMIT {limit:UInt32}"
    + NO_PROJECTIONS
)
REQUESTS_TENANT = (
    "SELECT " + _REQUEST_COLUMNS + " FROM rerank_events WHERE tenant_id = {tenant_id:String}"
    " AND "
    + _WINDOW
    + " ORDER BY timestamp DESC, event_id DESC LIMIT {limit:UInt32}"
    + NO_PROJECTIONS
)


def _bounds(params: dict[str, Any]) -> list[str]:
    """Price boundaries as DateTime64(3) parameter strings (the epoch when none)."""
    out = []
    for ms in sorted(set(params.get("bounds_ms") or [0])):
        t = datetime.fromtimestamp(ms / 1000, UTC)
        out.append(t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])
    return out


def _timed(run: Callable[[], Any], k: int) -> tuple[list[float], Any]:
    """One untimed warm-up, then k timed runs (ms); the last answer."""
    answer = run()
    times = []
    for _ in range(k):
        started = time.perf_counter()
        answer = run()
        times.append((time.perf_counter() - started) * 1000)
    return times, answer


def _int(v: Any) -> int:
    return int(v)


def job_prepare(ch: Any, params: dict[str, Any], k: int) -> dict[str, Any]:
    n, lo, hi, tenants, probes = ch.query(PREPARE).result_rows[0]
    busiest = ch.query(BUSIEST).result_rows
    return {
        "events": int(n),
        "min_ms": int(lo),
        "max_ms": int(hi),
        "tenants": int(tenants),
        "probes": int(probes),
        "busiest_tenant": busiest[0][0] if busiest else None,
        "busiest_events": int(busiest[0][1]) if busiest else 0,
    }


def job_stats(ch: Any, params: dict[str, Any], k: int) -> dict[str, Any]:
    window = {"from_ms": params["from_ms"], "to_ms": params["to_ms"]}
    times, rows = _timed(lambda: ch.query(STATS, parameters=window).result_rows, k)
    row = rows[0]
    figures = {name: _int(v) for name, v in zip(STATS_FIGURES, row[:7], strict=True)}
    figures["ok_probes"], figures["probes"] = int(row[7]), int(row[8])
    spend = ch.query(SPEND, parameters={**window, "bounds": _bounds(params)}).result_rows
    groups = [[p, m, int(since), int(i), int(o), int(pairs)] for p, m, since, i, o, pairs in spend]
    return {"times_ms": times, "figures": figures, "spend_groups": groups}


def job_usage(ch: Any, params: dict[str, Any], k: int) -> dict[str, Any]:
    bind = {
        "from_ms": params["from_ms"],
        "to_ms": params["to_ms"],
        "tenant_id": params["tenant_id"],
        "bounds": _bounds(params),
    }
    times, rows = _timed(lambda: ch.query(USAGE, parameters=bind).result_rows, k)
    return {"times_ms": times, "rows": [[_int(r[0]), r[1], r[2], *map(_int, r[3:])] for r in rows]}


def job_providers(ch: Any, params: dict[str, Any], k: int) -> dict[str, Any]:
    window = {"from_ms": params["from_ms"], "to_ms": params["to_ms"]}
    times, rows = _timed(lambda: ch.query(PROVIDERS, parameters=window).result_rows, k)
    out = []
    for p, requests, errors, ok_n, lat, q, peak, ok_probes, probes in rows:
        out.append(
            {
                "provider": p,
                "requests": int(requests),
                "errors": int(errors),
                "ok_requests": int(ok_n),
                "latency_sum": float(lat),
                "quantiles": [float(x) for x in q],
                "peak_rps": int(peak),
                "ok_probes": int(ok_probes),
                "probes": int(probes),
            }
        )
    return {"times_ms": times, "rows": out}


def job_requests(ch: Any, params: dict[str, Any], k: int) -> dict[str, Any]:
    bind: dict[str, Any] = {
        "from_ms": params["from_ms"],
        "to_ms": params["to_ms"],
        "limit": params["limit"],
    }
    sql = REQUESTS
    if params.get("tenant_id"):
        bind["tenant_id"] = params["tenant_id"]
        sql = REQUESTS_TENANT
    times, rows = _timed(lambda: ch.query(sql, parameters=bind).result_rows, k)
    return {"times_ms": times, "event_ids": [r[0] for r in rows]}


JOBS: dict[str, Callable[[Any, dict[str, Any], int], dict[str, Any]]] = {
    "prepare": job_prepare,
    "stats": job_stats,
    "usage": job_usage,
    "providers": job_providers,
    "requests": job_requests,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--job", choices=sorted(JOBS), required=True)
    parser.add_argument("--params", default="{}", help="JSON")
    parser.add_argument("--k", type=int, default=50)
    args = parser.parse_args()
    from metering.clickhouse.client import make_client

    ch = make_client(f"chdb://{args.data_dir / 'clickhouse'}", "default")
    try:
        result = JOBS[args.job](ch, json.loads(args.params), args.k)
    finally:
        ch.close()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
