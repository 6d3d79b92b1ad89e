"""What Grafana and the ClickHouse data source plugin do to a panel's SQL before
ClickHouse sees it, re-implemented to run the dashboards' queries on chDB.

Two steps, in the plugin's order:

1. The front end (`applyTemplateVariables` in src/data/CHDatasource.ts of
   grafana/clickhouse-datasource) replaces dashboard variables through Grafana's
   templateSrv: `$name`, `${name}` and `${name:format}`. Only the forms the dashboards
   use are implemented; `sqlstring` is Grafana's `sqlStringFormatter`
   (grafana/scenes, packages/scenes/src/variables/interpolation/formatRegistry.ts):
   `'` + value with `'` -> `''` and `"` -> `\\"` + `'`. Names the front end itself owns
   (`$__interval`, `$__from`, ...) would be replaced there too, so meeting one is an
   error: a dashboard must not rely on them reaching the plugin.
2. The backend expands the `$__` macros: `Interpolate` in pkg/macros/macros.go of
   grafana/clickhouse-datasource (v4.20.0, commit 1d04063a), which runs
   `macropro.Interpolate` (grafana/macropro, parser.go and macropro.go) with
   `ClickHouseMacros`: comments are stripped first, names are matched longest first
   and only as whole names, an optional parenthesised argument list is split on
   top-level commas (quotes and nested parentheses respected) and trimmed. Every
   handler of `ClickHouseMacros` is here, with the plugin's output format. The
   statement macros (`$__columns`, `$__lttb`, ... in pkg/macros/statement.go) are
   not: meeting one is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class QueryContext:
    """The time range and interval Grafana sends with a query."""

    start: datetime
    end: datetime
    interval: timedelta


# -- step 1: the front end's template variables -------------------------------------------

# templateSrv's regex (public/app/features/variables/utils.ts, variableRegex).
_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\${(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?}"
)
# Names templateSrv resolves itself (built-in variables): never passed to the plugin.
_GRAFANA_OWN = {
    "__interval",
    "__interval_ms",
    "__rate_interval",
    "__rate_interval_ms",
    "__from",
    "__to",
    "__range",
    "__range_s",
    "__range_ms",
    "__dashboard",
    "__user",
    "__org",
    "__timezone",
}


def _sqlstring(value: str) -> str:
    return "'" + re.sub(r"'|\"", lambda m: "''" if m.group() == "'" else '\\"', value) + "'"


def replace_variables(sql: str, variables: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if name in _GRAFANA_OWN:
            raise ValueError(f"${name} is replaced by Grafana's front end, not the plugin")
        if name not in variables:
            return match.group(0)  # not a variable: left as is (the plugin's macros)
        value = variables[name]
        if fmt is None:
            return value  # the plugin's own format(): a single value as it is
        if fmt == "sqlstring":
            return _sqlstring(value)
        raise ValueError(f"variable format {fmt!r} is not implemented here")

    return _VARIABLE.sub(one, sql)


# -- step 2: the backend's macros ------------------------------------------------------------

Macro = Callable[[QueryContext, list[str]], str]


def _unix(t: datetime) -> int:
    return math.floor(t.timestamp())  # Go's t.Unix(): seconds, floored


def _date_time(t: datetime) -> str:
    return f"toDateTime({_unix(t)})"


def _date_time64(t: datetime) -> str:
    return f"fromUnixTimestamp64Milli({math.floor(t.timestamp() * 1000)})"


def _date(t: datetime) -> str:
    return f"toDate('{t.astimezone(UTC):%Y-%m-%d}')"


def _args(name: str, args: list[str], want: int) -> list[str]:
    if len(args) != want:
        raise ValueError(f"{name} expected {want} argument(s), received {len(args)}")
    return args


def _go_duration(text: str) -> timedelta:
    """Go's time.ParseDuration for the plain forms ("300ms", "5m", "1h30m")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.fullmatch(r"((\d+(?:\.\d+)?)(ms|s|m|h))+", text)
    if not parts:
        raise ValueError(f"invalid duration {text!r}")
    seconds = sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text))
    return timedelta(seconds=seconds)


def _format_duration(d: timedelta) -> str:
    """macropro.FormatDuration: the largest whole unit."""
    ms = abs(round(d.total_seconds() * 1000))
    if ms == 0:
        return "0s"
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _interval_seconds(ctx: QueryContext) -> int:
    return int(max(ctx.interval.total_seconds(), 1))


def _time_interval(ctx: QueryContext, args: list[str]) -> str:
    (col,) = _args("$__timeInterval", args, 1)
    return f"toStartOfInterval(toDateTime({col}), INTERVAL {_interval_seconds(ctx)} second)"


def _time_interval_ms(ctx: QueryContext, args: list[str]) -> str:
    (col,) = _args("$__timeInterval_ms", args, 1)
    ms = int(max(ctx.interval // timedelta(milliseconds=1), 1))
    return f"toStartOfInterval(toDateTime64({col}, 3), INTERVAL {ms} millisecond)"


def _time_filter(ctx: QueryContext, args: list[str]) -> str:
    (col,) = _args("$__timeFilter", args, 1)
    return f"{col} >= {_date_time(ctx.start)} AND {col} <= {_date_time(ctx.end)}"


def _time_filter_ms(ctx: QueryContext, args: list[str]) -> str:
    (col,) = _args("$__timeFilter_ms", args, 1)
    return f"{col} >= {_date_time64(ctx.start)} AND {col} <= {_date_time64(ctx.end)}"


def _date_filter(ctx: QueryContext, args: list[str]) -> str:
    (col,) = _args("$__dateFilter", args, 1)
    return f"{col} >= {_date(ctx.start)} AND {col} <= {_date(ctx.end)}"


def _date_time_filter(ctx: QueryContext, args: list[str]) -> str:
    date_col, time_col = _args("$__dateTimeFilter", args, 2)
    dates = f"({date_col} >= {_date(ctx.start)} AND {date_col} <= {_date(ctx.end)})"
    times = f"({time_col} >= {_date_time(ctx.start)} AND {time_col} <= {_date_time(ctx.end)})"
    return f"{dates} AND {times}"


def _time_from(ctx: QueryContext, args: list[str]) -> str:
    (col,) = _args("$__timeFrom", args, 1)
    return f"{col} >= {_date_time(ctx.start)}"


def _time_to(ctx: QueryContext, args: list[str]) -> str:
    (col,) = _args("$__timeTo", args, 1)
    return f"{col} <= {_date_time(ctx.end)}"


def _time_group(ctx: QueryContext, args: list[str]) -> str:
    col, period = _args("$__timeGroup", args, 2)
    seconds = round(_go_duration(period.strip().strip("'\"")).total_seconds())
    if seconds <= 0:
        raise ValueError("$__timeGroup: interval must be positive")
    return f"toStartOfInterval(toDateTime({col.strip()}), INTERVAL {seconds} second)"


def _no_context(name: str) -> Macro:
    def fail(ctx: QueryContext, args: list[str]) -> str:
        raise ValueError(f"$__{name}: no {name} name in query context")

    return fail


MACROS: dict[str, Macro] = {
    # macropro.DefaultMacros, kept by the plugin
    "interval": lambda ctx, _: _format_duration(ctx.interval),
    "interval_ms": lambda ctx, _: str(ctx.interval // timedelta(milliseconds=1)),
    "table": _no_context("table"),
    "column": _no_context("column"),
    # the plugin's overrides and extensions
    "timeFilter": _time_filter,
    "timeFrom": _time_from,
    "timeTo": _time_to,
    "timeGroup": _time_group,
    "fromTime": lambda ctx, _: _date_time(ctx.start),
    "toTime": lambda ctx, _: _date_time(ctx.end),
    "fromTime_ms": lambda ctx, _: _date_time64(ctx.start),
    "toTime_ms": lambda ctx, _: _date_time64(ctx.end),
    "timeFilter_ms": _time_filter_ms,
    "dateFilter": _date_filter,
    "dateTimeFilter": _date_time_filter,
    "dt": _date_time_filter,
    "timeInterval": _time_interval,
    "timeInterval_ms": _time_interval_ms,
    "interval_s": lambda ctx, _: str(_interval_seconds(ctx)),
}
STATEMENT_MACROS = ("columns", "rateColumns", "perSecondColumns", "increaseColumns", "lttb")
PREFIX = "$__"


def _scan_string(s: str, pos: int) -> int:
    """macropro's scanStringLiteral: past a quoted literal ('' / \"\" escapes)."""
    quote, j = s[pos], pos + 1
    while j < len(s):
        if s[j] == quote:
            if j + 1 < len(s) and s[j + 1] == quote:
                j += 2
                continue
            return j + 1
        j += 1
    return j


def _scan_quoted(s: str, pos: int) -> int:
    """Past a '...' or "..." literal with the plugin's flags: doubled quotes and
    backslash escapes (BackslashEscape), or a `...` identifier (BacktickQuote)."""
    quote, j = s[pos], pos + 1
    while j < len(s):
        if s[j] == "\\" and quote != "`":
            j += 2
            continue
        if s[j] == quote:
            if j + 1 < len(s) and s[j + 1] == quote:
                j += 2
                continue
            return j + 1
        j += 1
    return j


_DOLLAR_QUOTE = re.compile(r"\$(\w*)\$")


def strip_comments(sql: str) -> str:
    """macropro.StripComments with the plugin's `clickHouseComments` flags: -- and
    /* */ comments blanked to spaces; string literals (backslash escapes), backtick
    identifiers and $tag$...$tag$ literals kept as they are."""
    out, i = [], 0
    while i < len(sql):
        c = sql[i]
        if c in "'\"`":
            j = _scan_quoted(sql, i)
            out.append(sql[i:j])
            i = j
        elif c == "$" and (m := _DOLLAR_QUOTE.match(sql, i)):
            end = sql.find(m.group(0), m.end())
            j = m.end() if end < 0 else end + len(m.group(0))
            out.append(sql[i:j])
            i = j
        elif sql.startswith("--", i):
            j = i
            while j < len(sql) and sql[j] not in "\r\n":
                j += 1
            out.append(" " * (j - i))
            i = j
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            j = len(sql) if end < 0 else end + 2
            out.append(" " * (j - i))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _closing_paren(s: str) -> int:
    depth, i = 0, 0
    while i < len(s):
        c = s[i]
        if c in "'\"":
            i = _scan_string(s, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _split_args(raw: str) -> list[str]:
    raw = raw.strip()
    if not raw:
        return []
    args, depth, start, i = [], 0, 0, 0
    while i < len(raw):
        c = raw[i]
        if c in "'\"":
            i = _scan_string(raw, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            if depth == 0:
                raise ValueError(f"unexpected ')' at position {i}")
            depth -= 1
        elif c == "," and depth == 0:
            args.append(raw[start:i].strip())
            start = i + 1
        i += 1
    if depth:
        raise ValueError("unbalanced parentheses in arguments")
    args.append(raw[start:].strip())
    return args


def _is_name_char(c: str) -> bool:
    return c == "_" or (c.isascii() and c.isalnum())


def expand_macros(sql: str, ctx: QueryContext) -> str:
    sql = strip_comments(sql)
    for name in STATEMENT_MACROS:
        if re.search(re.escape(PREFIX + name) + r"(?!\w)", sql):
            raise ValueError(f"statement macro $__{name} is not implemented here")
    for name in sorted(MACROS, key=lambda n: (-len(n), n)):
        token, out, s = PREFIX + name, [], sql
        while (idx := s.find(token)) >= 0:
            after = idx + len(token)
            if after < len(s) and _is_name_char(s[after]):
                out.append(s[:after])
                s = s[after:]
                continue
            out.append(s[:idx])
            s = s[after:]
            raw = ""
            if s.startswith("("):
                end = _closing_paren(s)
                if end >= 0:
                    raw, s = s[1:end], s[end + 1 :]
            out.append(MACROS[name](ctx, _split_args(raw)))
        out.append(s)
        sql = "".join(out)
    return sql


def expand(sql: str, ctx: QueryContext, variables: Mapping[str, str] | None = None) -> str:
    """The SQL ClickHouse receives for this panel query."""
    return expand_macros(replace_variables(sql, variables or {}), ctx)
