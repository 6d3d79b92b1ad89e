"""Grafana dashboards as code, for the official ClickHouse data source plugin.

The dashboards are described here (`boards.py`: panels with their SQL and the columns
each returns), turned into dashboard JSON with Grafana's foundation SDK (`build.py`),
and provisioned by `metering dashboards push` (the HTTP API, through grafana-client) or
`metering dashboards export DIR` (files for Grafana's file provisioning): `provision.py`.

They live inside the `metering` package, not in the repository's `dashboards/` folder,
so that an installed `metering` (a wheel has no `dashboards/` folder) can push them;
`dashboards/` keeps the README and the exported JSON, written by `export` and checked
against this code by the tests. Nothing here imports the rest of the service: the
queries read ClickHouse through Grafana, never through `metering`.
"""

DEFAULT_DATASOURCE_UID = "clickhouse"
DEFAULT_FOLDER = "Rerank metering"
