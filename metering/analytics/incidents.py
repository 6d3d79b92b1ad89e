"""Provider incidents from uptime probes (`GET /v1/incidents`).

An incident of a (provider, region) opens after 3 consecutive failed probes and closes
at the first ok probe after them. Choices where the contract is silent:
- `started_at` is the timestamp of the run's first failed probe (when the provider
  started failing), not of the third (when the incident was recognised);
- `ended_at` is the timestamp of the ok probe that closed it; null while none came;
- `failed_probes` counts every failed probe of the run, including any after the
  window's `to` (an incident is reported whole, not cut at the window);
- an incident is listed when it overlaps the window: started before `to`, and not
  ended at or before `from`;
- probes are ordered by (timestamp, ok): of two probes of a target at the same
  millisecond, the failed one comes first, so equal timestamps order the same way
  on every read;
- a run is looked for at most LOOKBACK before `from`: a run that has been failing for
  longer than that before the window starts is reported from its first failure inside
  the lookback (this bounds what a read scans however long the probe history is).

`detect` is the rule, a pure function over probe rows; `read_incidents` applies the same
rule in ClickHouse to the probes it needs: for each (provider, region), from its last ok
probe before `from` (the start of any run still going at `from`) through its first ok
probe at or after `to` (the end of any run still going at `to`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from metering.analytics.requests import rfc3339_ms, to_ms
from metering.analytics.window import Window

OPEN_AFTER = 3  # consecutive failed probes
LOOKBACK = timedelta(days=90)


@dataclass(frozen=True)
class ProbeRow:
    provider: str
    region: str
    ts_ms: int
    probe_id: str
    ok: bool


@dataclass(frozen=True)
class Incident:
    provider: str
    region: str
    started_ms: int
    ended_ms: int | None
    failed_probes: int

    def overlaps(self, start_ms: int, end_ms: int) -> bool:
        return self.started_ms < end_ms and (self.ended_ms is None or self.ended_ms > start_ms)

    def as_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "region": self.region,
            "started_at": rfc3339_ms(self.started_ms),
            "ended_at": None if self.ended_ms is None else rfc3339_ms(self.ended_ms),
            "failed_probes": self.failed_probes,
        }


def detect(probes: Iterable[ProbeRow]) -> list[Incident]:
    """Every incident in `probes` (any order), sorted by started_at desc."""
    by_target: dict[tuple[str, str], list[ProbeRow]] = {}
    for probe in probes:
        by_target.setdefault((probe.provider, probe.region), []).append(probe)
    incidents: list[Incident] = []
    for (provider, region), rows in by_target.items():
        rows.sort(key=lambda p: (p.ts_ms, p.ok))
        run_start: int | None = None
        failed = 0
        for probe in rows:
            if not probe.ok:
                if failed == 0:
                    run_start = probe.ts_ms
                failed += 1
                continue
            if failed >= OPEN_AFTER and run_start is not None:
                incidents.append(Incident(provider, region, run_start, probe.ts_ms, failed))
            failed, run_start = 0, None
        if failed >= OPEN_AFTER and run_start is not None:
            incidents.append(Incident(provider, region, run_start, None, failed))
    incidents.sort(key=lambda i: (i.started_ms, i.provider, i.region), reverse=True)
    return incidents


# Runs are found in ClickHouse, so a read returns incidents, not every probe of the
# window (a seed month holds ~350K probes; reading them all into Python took 1.5 s).
# Probes are read from the last ok probe before `from` (or the lookback's start) through
# the first ok probe at or after `to` (or the newest), taken over all targets: a target
# whose bounds are narrower only gets runs that end before the window (filtered out)
# or start after it. Per (provider, region) the probes form one sorted array; each probe
# gets its run number, the count of ok probes before it (an ok probe closes the run
# before its own). Only failed probes and the ok probes right after one are kept and
# grouped by run: a group is a run's failures plus the probe that ended it, if any.
# `detect` is the same rule in Python; a test holds the two to each other.
_INCIDENTS = """
SELECT provider, region,
    minIf(p.1, NOT p.2) AS started,
    countIf(p.2) AS closed,
    minIf(p.1, p.2) AS ended,
    countIf(NOT p.2) AS failed
FROM (
    SELECT provider, region, s,
        arrayMap(x -> toUInt64(x.2), s) AS oks,
        arrayMap((x, c) -> c - toUInt64(x.2), s, arrayCumSum(oks)) AS runs,
        arrayMap((x, i) -> NOT x.2 OR (i > 1 AND NOT s[i - 1].2), s, arrayEnumerate(s)) AS keep
    FROM (
        SELECT provider, region,
            arraySort(groupArray((toUnixTimestamp64Milli(timestamp), ok))) AS s
        FROM uptime_probes
        WHERE timestamp >= ifNull(
                (SELECT minOrNull(lo) FROM (
                    SELECT max(timestamp) AS lo FROM uptime_probes
                    WHERE ok {provider_filter}
                      AND timestamp >= fromUnixTimestamp64Milli({lookback:Int64}, 'UTC')
                      AND timestamp < fromUnixTimestamp64Milli({start:Int64}, 'UTC')
                    GROUP BY provider, region)),
                fromUnixTimestamp64Milli({lookback:Int64}, 'UTC'))
          AND timestamp <= ifNull(
                (SELECT maxOrNull(hi) FROM (
                    SELECT min(timestamp) AS hi FROM uptime_probes
                    WHERE ok {provider_filter}
                      AND timestamp >= fromUnixTimestamp64Milli({end:Int64}, 'UTC')
                    GROUP BY provider, region)),
                toDateTime64('2299-12-31 00:00:00', 3, 'UTC'))
          {provider_filter}
        GROUP BY provider, region
    )
)
ARRAY JOIN arrayFilter((x, k) -> k, s, keep) AS p, arrayFilter((r, k) -> k, runs, keep) AS run
GROUP BY provider, region, run
HAVING failed >= {open_after:UInt32}
SETTINGS log_comment = 'analytics.incidents'
"""
_PROVIDER_FILTER = "AND provider = {provider:String}"


def _incidents_sql(by_provider: bool) -> str:
    return _INCIDENTS.replace("{provider_filter}", _PROVIDER_FILTER if by_provider else "").strip()


def read_incidents(client: Client, window: Window, provider: str | None = None) -> list[Incident]:
    """The incidents overlapping `window` (of `provider`, or all), started_at desc."""
    params: dict[str, Any] = {
        "lookback": to_ms(window.start - LOOKBACK),
        "start": to_ms(window.start),
        "end": to_ms(window.end),
        "open_after": OPEN_AFTER,
    }
    if provider is not None:
        params["provider"] = provider
    rows = client.query(_incidents_sql(provider is not None), parameters=params).result_rows
    found = [Incident(r[0], r[1], int(r[2]), int(r[4]) if r[3] else None, int(r[5])) for r in rows]
    found.sort(key=lambda i: (i.started_ms, i.provider, i.region), reverse=True)
    start_ms, end_ms = params["start"], params["end"]
    return [i for i in found if i.overlaps(start_ms, end_ms)]
