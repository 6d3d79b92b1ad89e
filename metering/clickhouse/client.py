"""One factory for ClickHouse clients over clickhouse-connect.

`chdb://PATH` opens embedded ClickHouse (chDB) in this process; `http(s)://user:pass@
host:port/db` reaches a server or cluster. The same SQL runs on both.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

QUERY_SETTINGS: dict[str, Any] = {
    # Parse RFC 3339 timestamps with offsets on insert.
    "date_time_input_format": "best_effort",
}


def make_client(url: str, database: str = "default") -> Client:
    """Open a client on `database` (created if missing) at `url`."""
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        path = unquote(parts.netloc + parts.path)
        bootstrap = clickhouse_connect.get_client(dsn=f"chdb://{path}")
        bootstrap.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        return clickhouse_connect.get_client(
            dsn=f"chdb://{path}", database=database, settings=QUERY_SETTINGS
        )
    if parts.scheme in ("http", "https"):
        db_in_url = parts.path.strip("/") or None
        target = database if database != "default" or db_in_url is None else db_in_url
        common: dict[str, Any] = {
            "host": parts.hostname or "localhost",
            "port": parts.port or (8443 if parts.scheme == "https" else 8123),
            "username": unquote(parts.username or "default"),
            "password": unquote(parts.password or ""),
            "secure": parts.scheme == "https",
        }
        bootstrap = clickhouse_connect.get_client(**common)
        bootstrap.command(f"CREATE DATABASE IF NOT EXISTS `{target}`")
        bootstrap.close()
        return clickhouse_connect.get_client(**common, database=target, settings=QUERY_SETTINGS)
    raise ValueError(
        f"METERING_CLICKHOUSE_URL: unsupported scheme {parts.scheme!r}; "
        "use chdb://PATH or http(s)://user:pass@host:port/db"
    )
