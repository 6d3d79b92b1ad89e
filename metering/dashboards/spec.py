"""What a dashboard is made of, independent of Grafana's JSON: panels with their SQL and
the columns that SQL returns. The builder (`build.py`) turns these into dashboard JSON;
the tests run every panel's SQL on chDB, after expanding the plugin's macros, and check
the columns named here.

Conventions of the SQL (for the ClickHouse data source plugin's SQL editor):
- time series panels return `time` first (the bucket, ascending), then optional label
  columns (String), then numeric columns: "long" frames, which the plugin turns into one
  series per label value;
- figures that the service also computes use `[$__fromTime, $__toTime)`, the service's
  half-open window (to the second, as Grafana's time range reaches the plugin);
- platform-wide panels read the service's rollups (projections, below): exact figures
  as whole hours plus the window's edges read from rows, series by hour or coarser;
  tenant panels read rows (the table's key starts with day and tenant), with
  `$__timeFilter(timestamp)` and `$__timeInterval(timestamp)`;
- the tenant variable is interpolated as `${tenant:sqlstring}` (a quoted, escaped
  literal); `$__interval` is never used (Grafana's front end replaces it before the
  plugin sees it, as a duration such as "1m"): `$__interval_s` is the plugin's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["stat", "timeseries", "bars", "table", "text"]


@dataclass(frozen=True)
class Panel:
    title: str
    kind: Kind
    sql: str = ""
    columns: tuple[str, ...] = ()  # the columns `sql` returns, in order
    labels: tuple[str, ...] = ()  # of those, the String label columns of a series
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""
    content: str = ""  # markdown of a text panel
    rollup: bool = False  # answered from projections (tests run it with force_optimize_projection)

    @property
    def is_series(self) -> bool:
        return self.kind in ("timeseries", "bars")


@dataclass(frozen=True)
class Variable:
    """A query variable over the plugin: the first column of `sql` holds the values."""

    name: str
    label: str
    sql: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Board:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = ()
    time_from: str = "now-30d"


# -- reads the service's rollups can answer ------------------------------------------------
# Platform-wide panels read the `p_hourly` / `p_hourly_tenants` / `p_daily_tenants`
# projections of rerank_events, as the service does (metering/analytics/facts.py): a query
# whose WHERE and GROUP BY use only `toStartOfHour(timestamp)` (and provider, model, status)
# and whose aggregates are the projection's is answered from hundreds of rows per day
# instead of every event. Hours are UTC whatever the server's time zone.
FROM_HOUR = "toStartOfHour(addSeconds($__fromTime, 3599), 'UTC')"  # first whole hour
TO_HOUR = "toStartOfHour($__toTime, 'UTC')"  # end of the last whole hour
# [from, to) split in two exact parts: its whole hours (projection) and its edges (rows).
WHOLE_HOURS = f"toStartOfHour(timestamp) >= {FROM_HOUR} AND toStartOfHour(timestamp) < {TO_HOUR}"
EDGES = (
    f"((timestamp >= $__fromTime AND timestamp < least({FROM_HOUR}, $__toTime))"
    f" OR (timestamp >= greatest({TO_HOUR}, {FROM_HOUR}) AND timestamp < $__toTime))"
)
# Series at hour resolution or coarser: every hour the range touches, whole.
SERIES_HOURS = (
    "toStartOfHour(timestamp) >= toStartOfHour($__fromTime, 'UTC')"
    " AND toStartOfHour(timestamp) <= $__toTime"
)
# Grafana's interval, at least an hour (Grafana's intervals above an hour are whole hours).
HOUR_BUCKET = "toStartOfInterval(hour, toIntervalSecond(greatest($__interval_s, 3600)))"
FALLBACKS = (
    "sumMap(tupleElement(fallbacks, 'provider'), arrayWithConstant(length(fallbacks), toUInt64(1)))"
)


def base_cte(*where: str, hourly: bool = True) -> str:
    """A `base` CTE of p_hourly's columns per (hour, provider p, status), or per (p,
    status) with `hourly=False`: count c, latency sum lat and sketch state q, and fb, the
    failed fallback attempts per provider tried. One branch per `where` part (the parts
    of an exact window)."""
    hour, group = ("toStartOfHour(timestamp) AS hour, ", "hour, ") if hourly else ("", "")
    branches = [
        f"  SELECT {hour}provider AS p, status, count() AS c, sum(latency_ms) AS lat,\n"
        f"    quantilesDDState(0.01, 0.5, 0.95, 0.99)(latency_ms) AS q,\n"
        f"    {FALLBACKS} AS fb\n"
        f"  FROM rerank_events WHERE {part}\n"
        f"  GROUP BY {group}p, status"
        for part in where
    ]
    return "WITH base AS (\n" + "\n  UNION ALL\n".join(branches) + "\n)"


def base_attempts(keys: str = "") -> str:
    """From `base`: requests n and errors e per row (`keys` columns, then provider p):
    the served ones, then each failed fallback attempt as a request and an error of
    the provider it tried."""
    return (
        f"SELECT {keys}p, c AS n, if(status = 'error', c, 0) AS e FROM base\n"
        "  UNION ALL\n"
        f"  SELECT {keys}k AS p, v AS n, v AS e FROM base\n"
        "  ARRAY JOIN tupleElement(fb, 1) AS k, tupleElement(fb, 2) AS v"
    )


WINDOW = "timestamp >= $__fromTime AND timestamp < $__toTime"
SERIES = "$__timeFilter(timestamp)"
BUCKET = "$__timeInterval(timestamp)"
TENANT = "tenant_id = ${tenant:sqlstring}"
