"""The macro expander of these tests against the plugin's own expectations: the cases
of pkg/macros/macros_test.go in grafana/clickhouse-datasource (TestInterpolate,
TestInterpolateNestedMacros, ...BackslashEscapedStringLiterals,
...BacktickAndDollarQuotedRegions and the per-macro tests), plus Grafana's `sqlstring`
variable format (formatRegistry's own tests)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.dashboards.macros import QueryContext, expand, expand_macros, replace_variables

FROM = datetime(2014, 11, 12, 11, 45, 26, 123000, tzinfo=UTC)
TO = datetime(2015, 11, 12, 11, 45, 26, 456000, tzinfo=UTC)
CTX = QueryContext(FROM, TO, timedelta(minutes=1))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            "select * from foo where $__timeFilter(cast(sth as timestamp) )",
            "select * from foo where cast(sth as timestamp) >= toDateTime(1415792726)"
            " AND cast(sth as timestamp) <= toDateTime(1447328726)",
        ),
        (
            "select * from foo where $__timeFilter_ms(cast(sth as timestamp))",
            "select * from foo where cast(sth as timestamp)"
            " >= fromUnixTimestamp64Milli(1415792726123) AND cast(sth as timestamp)"
            " <= fromUnixTimestamp64Milli(1447328726456)",
        ),
        (
            "select * from foo where ( date >= $__fromTime ) and ( date <= $__toTime ) limit 100",
            "select * from foo where ( date >= toDateTime(1415792726) )"
            " and ( date <= toDateTime(1447328726) ) limit 100",
        ),
        (
            "select * from foo where ( date >= $__fromTime_ms and date <= $__toTime_ms ) limit 100",
            "select * from foo where ( date >= fromUnixTimestamp64Milli(1415792726123)"
            " and date <= fromUnixTimestamp64Milli(1447328726456) ) limit 100",
        ),
        (
            "SELECT $__timeInterval($__fromTime) AS from_time",
            "SELECT toStartOfInterval(toDateTime(toDateTime(1415792726)), INTERVAL 60 second)"
            " AS from_time",
        ),
        (
            "SELECT $__timeInterval_ms($__fromTime_ms)",
            "SELECT toStartOfInterval(toDateTime64(fromUnixTimestamp64Milli(1415792726123), 3),"
            " INTERVAL 60000 millisecond)",
        ),
        (
            "select * from foo where $__timeFilter(coalesce(closed_at, $__toTime))",
            "select * from foo where coalesce(closed_at, toDateTime(1447328726))"
            " >= toDateTime(1415792726) AND coalesce(closed_at, toDateTime(1447328726))"
            " <= toDateTime(1447328726)",
        ),
        (
            r"select * from foo where msg = 'it\'s -- fine' and $__fromTime",
            r"select * from foo where msg = 'it\'s -- fine' and toDateTime(1415792726)",
        ),
        (
            "select * from foo where msg = 'it''s' and $__fromTime",
            "select * from foo where msg = 'it''s' and toDateTime(1415792726)",
        ),
        (
            "SELECT `it's` AS x, msg FROM t WHERE msg = 'a--b' AND $__timeFilter(ts)",
            "SELECT `it's` AS x, msg FROM t WHERE msg = 'a--b'"
            " AND ts >= toDateTime(1415792726) AND ts <= toDateTime(1447328726)",
        ),
        (
            "SELECT $doc$a--b$doc$ AS x FROM t WHERE $__toTime",
            "SELECT $doc$a--b$doc$ AS x FROM t WHERE toDateTime(1447328726)",
        ),
        (
            "SELECT $__dateTimeFilter(dateCol, timeCol)",
            "SELECT (dateCol >= toDate('2014-11-12') AND dateCol <= toDate('2015-11-12'))"
            " AND (timeCol >= toDateTime(1415792726) AND timeCol <= toDateTime(1447328726))",
        ),
        (
            "SELECT $__timeGroup(ts, 5m), $__timeGroup(ts, '1h'), $__interval_s",
            "SELECT toStartOfInterval(toDateTime(ts), INTERVAL 300 second),"
            " toStartOfInterval(toDateTime(ts), INTERVAL 3600 second), 60",
        ),
        ("SELECT 1 -- $__timeFilter(ts)", "SELECT 1                     "),
    ],
)
def test_expansion_matches_the_plugins_cases(query: str, expected: str) -> None:
    assert expand_macros(query, CTX) == expected


def test_interval_has_a_floor_of_one_second() -> None:
    tiny = QueryContext(FROM, TO, timedelta(milliseconds=20))
    assert expand_macros("$__interval_s $__timeInterval(c)", tiny) == (
        "1 toStartOfInterval(toDateTime(c), INTERVAL 1 second)"
    )


@pytest.mark.parametrize(
    "query", ["$__timeFilter()", "$__dateTimeFilter(d)", "$__timeGroup(ts, nope)", "$__table"]
)
def test_bad_macro_calls_fail_as_in_the_plugin(query: str) -> None:
    with pytest.raises(ValueError):
        expand_macros(query, CTX)


def test_variables_are_replaced_before_macros_as_grafana_does() -> None:
    variables = {"tenant": "o'b\"c"}
    assert replace_variables("t = ${tenant:sqlstring}", variables) == "t = 'o''b\\\"c'"
    assert replace_variables("t = '$tenant' AND $__fromTime", variables) == (
        "t = 'o'b\"c' AND $__fromTime"
    )
    assert expand("$__fromTime AND t = ${tenant:sqlstring}", CTX, {"tenant": "a"}) == (
        "toDateTime(1415792726) AND t = 'a'"
    )


@pytest.mark.parametrize("query", ["SELECT $__interval", "SELECT $__from", "x > ${__to}"])
def test_grafanas_own_variables_never_reach_the_plugin(query: str) -> None:
    with pytest.raises(ValueError, match="front end"):
        replace_variables(query, {})
