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
- probes are ordered by (timestamp, probe_id), so equal timestamps order the same way
  on every read;
- a run is looked for at most LOOKBACK before `from`: a run that has been failing for
  longer than that before the window starts is reported from its first failure inside
  the lookback (this bounds what a read scans however long the probe history is).

`detect` is the rule, a pure function over probe rows; `read_incidents` feeds it the
probes it needs: for each (provider, region), from its last ok probe before `from` (the
start of any run still going at `from`) through its first ok probe at or after `to` (the
end of any run still going at `to`).
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
        rows.sort(key=lambda p: (p.ts_ms, p.probe_id))
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


# For each (provider, region): its probes from the last ok probe before `from` (or the
# lookback's start) through the first ok probe at or after `to` (or the newest probe).
_PROBES = """
WITH
    bounds_before AS (
        SELECT provider, region, max(timestamp) AS lo
        FROM uptime_probes
        WHERE ok
          AND timestamp >= fromUnixTimestamp64Milli({lookback:Int64}, 'UTC')
          AND timestamp < fromUnixTimestamp64Milli({start:Int64}, 'UTC')
          {provider_filter}
        GROUP BY provider, region
    ),
    bounds_after AS (
        SELECT provider, region, min(timestamp) AS hi
        FROM uptime_probes
        WHERE ok AND timestamp >= fromUnixTimestamp64Milli({end:Int64}, 'UTC')
          {provider_filter}
        GROUP BY provider, region
    )
SELECT p.provider, p.region, toUnixTimestamp64Milli(p.timestamp), p.probe_id, p.ok
FROM uptime_probes AS p
LEFT JOIN bounds_before AS b ON p.provider = b.provider AND p.region = b.region
LEFT JOIN bounds_after AS a ON p.provider = a.provider AND p.region = a.region
WHERE p.timestamp >= ifNull(b.lo, fromUnixTimestamp64Milli({lookback:Int64}, 'UTC'))
  AND (p.timestamp < fromUnixTimestamp64Milli({end:Int64}, 'UTC')
       OR a.hi IS NULL OR p.timestamp <= a.hi)
  {probe_filter}
SETTINGS join_use_nulls = 1, log_comment = 'analytics.incidents'
"""
_PROVIDER_FILTER = "AND provider = {provider:String}"
_PROBE_FILTER = "AND p.provider = {provider:String}"


def _probes_sql(by_provider: bool) -> str:
    return (
        _PROBES.replace("{provider_filter}", _PROVIDER_FILTER if by_provider else "")
        .replace("{probe_filter}", _PROBE_FILTER if by_provider else "")
        .strip()
    )


def read_incidents(client: Client, window: Window, provider: str | None = None) -> list[Incident]:
    """The incidents overlapping `window` (of `provider`, or all), started_at desc."""
    params: dict[str, Any] = {
        "lookback": to_ms(window.start - LOOKBACK),
        "start": to_ms(window.start),
        "end": to_ms(window.end),
    }
    if provider is not None:
        params["provider"] = provider
    rows = client.query(_probes_sql(provider is not None), parameters=params).result_rows
    probes = (ProbeRow(r[0], r[1], int(r[2]), r[3], bool(r[4])) for r in rows)
    start_ms, end_ms = params["start"], params["end"]
    return [i for i in detect(probes) if i.overlaps(start_ms, end_ms)]
