"""Dashboard JSON from the board specs, with Grafana's foundation SDK.

`dashboards(datasource_uid)` is what `push` sends and `export` writes: one JSON model per
board, every panel and every target naming the ClickHouse data source by UID. Panel ids
and grid positions are set here (left to right, wrapping at Grafana's 24 columns), so
the output is the same on every run and a re-export shows no spurious diff.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import stat, table, text, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import text as text_models

from metering.dashboards import DEFAULT_DATASOURCE_UID, overview, providers, spend, tenant
from metering.dashboards.query import ClickHouseQueryBuilder, Format, datasource_ref
from metering.dashboards.spec import Board, Panel

BOARDS: tuple[Board, ...] = (overview.BOARD, providers.BOARD, spend.BOARD, tenant.BOARD)
TAGS = ["rerank-metering"]
GRID_WIDTH = 24


def _layout(panels: tuple[Panel, ...]) -> list[dashboard_models.GridPos]:
    """Left to right in rows; a row is as tall as its tallest panel."""
    out = []
    x = y = row_height = 0
    for panel in panels:
        if x + panel.width > GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        out.append(dashboard_models.GridPos(h=panel.height, w=panel.width, x=x, y=y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return out


def _panel(
    spec: Panel, pid: int, pos: dashboard_models.GridPos, ds: dashboard_models.DataSourceRef
) -> cogbuilder.Builder[dashboard_models.Panel]:
    if spec.kind == "text":
        return (
            text.Panel()
            .id(pid)
            .title(spec.title)
            .grid_pos(pos)
            .mode(text_models.TextMode.MARKDOWN)
            .content(spec.content)
        )
    fmt = Format.TIME_SERIES if spec.is_series else Format.TABLE
    target = ClickHouseQueryBuilder(spec.sql, fmt, ds)
    if spec.kind == "stat":
        return (
            stat.Panel()
            .id(pid)
            .title(spec.title)
            .description(spec.description)
            .datasource(ds)
            .with_target(target)
            .grid_pos(pos)
            .unit(spec.unit)
            .graph_mode(common.BigValueGraphMode.NONE)
            .color_mode(common.BigValueColorMode.NONE)
            .reduce_options(
                common_builders.ReduceDataOptions().values(False).calcs(["lastNotNull"])
            )
        )
    if spec.kind == "table":
        return (
            table.Panel()
            .id(pid)
            .title(spec.title)
            .description(spec.description)
            .datasource(ds)
            .with_target(target)
            .grid_pos(pos)
            .unit(spec.unit)
            .show_header(True)
        )
    series = (
        timeseries.Panel()
        .id(pid)
        .title(spec.title)
        .description(spec.description)
        .datasource(ds)
        .with_target(target)
        .grid_pos(pos)
        .unit(spec.unit)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
    )
    if spec.kind == "bars":
        series = (
            series.draw_style(common.GraphDrawStyle.BARS)
            .fill_opacity(80)
            .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        )
    return series


def board_builder(board: Board, datasource_uid: str) -> dashboard_builders.Dashboard:
    ds = datasource_ref(datasource_uid)
    builder = (
        dashboard_builders.Dashboard(board.title)
        .uid(board.uid)
        .description(board.description)
        .tags(TAGS)
        .editable()
        .timezone("utc")
        .time(board.time_from, "now")
        .refresh("5m")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .annotations([])  # {"list": []}: Grafana adds its built-in one to a list
    )
    for variable in board.variables:
        builder = builder.with_variable(
            dashboard_builders.QueryVariable(variable.name)
            .label(variable.label)
            .datasource(ds)
            .query({"refId": variable.name, "queryType": "sql", "rawSql": variable.sql})
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.DISABLED)
        )
    for pid, (spec, pos) in enumerate(zip(board.panels, _layout(board.panels), strict=True), 1):
        builder = builder.with_panel(_panel(spec, pid, pos, ds))
    return builder


def dashboard_json(board: Board, datasource_uid: str = DEFAULT_DATASOURCE_UID) -> dict[str, Any]:
    """The dashboard's JSON model, as plain JSON values."""
    model = board_builder(board, datasource_uid).build()
    data: dict[str, Any] = json.loads(json.dumps(model, cls=JSONEncoder))
    return data


def dashboards(datasource_uid: str = DEFAULT_DATASOURCE_UID) -> list[dict[str, Any]]:
    return [dashboard_json(board, datasource_uid) for board in BOARDS]
