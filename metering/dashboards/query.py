"""A query of the ClickHouse data source plugin (grafana-clickhouse-datasource), as the
foundation SDK's `Dataquery` variant: the SDK ships builders for Grafana's own data
sources only, so this is the plugin's query model written out.

The fields are the plugin's `CHSqlQuery` (src/types/sql.ts of grafana/clickhouse-datasource,
v4): `editorType: "sql"` (the SQL editor, not the query builder), `rawSql`, `format`
(sqlds' format numbers: 0 time series, 1 table), `queryType` (the editor's name for the
same choice) and `pluginVersion`: a query without a version >= 4.0.0 is migrated as a v3
query when the editor opens it (src/data/migration.ts), so one is always set.
"""

from __future__ import annotations

import enum
from typing import Any, Self

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard

PLUGIN_TYPE = "grafana-clickhouse-datasource"
PLUGIN_VERSION = "4.0.0"  # the query model's version (v4), not a pin of the plugin


class Format(enum.IntEnum):
    TIME_SERIES = 0
    TABLE = 1


_QUERY_TYPES = {Format.TIME_SERIES: "timeseries", Format.TABLE: "table"}


def datasource_ref(uid: str) -> dashboard.DataSourceRef:
    return dashboard.DataSourceRef(type_val=PLUGIN_TYPE, uid=uid)


class ClickHouseQuery(cogvariants.Dataquery):
    def __init__(
        self, ref_id: str, raw_sql: str, fmt: Format, datasource: dashboard.DataSourceRef
    ) -> None:
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.format = fmt
        self.datasource = datasource

    def to_json(self) -> dict[str, object]:
        return {
            "refId": self.ref_id,
            "datasource": self.datasource.to_json(),
            "editorType": "sql",
            "rawSql": self.raw_sql,
            "format": int(self.format),
            "queryType": _QUERY_TYPES[self.format],
            "pluginVersion": PLUGIN_VERSION,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        return cls(
            str(data.get("refId", "A")),
            str(data["rawSql"]),
            Format(int(data.get("format", Format.TABLE))),
            dashboard.DataSourceRef.from_json(dict(data.get("datasource") or {})),
        )


class ClickHouseQueryBuilder(cogbuilder.Builder[ClickHouseQuery]):
    def __init__(self, raw_sql: str, fmt: Format, datasource: dashboard.DataSourceRef) -> None:
        self._query = ClickHouseQuery("A", raw_sql, fmt, datasource)

    def ref_id(self, ref_id: str) -> Self:
        self._query.ref_id = ref_id
        return self

    def build(self) -> ClickHouseQuery:
        return self._query
