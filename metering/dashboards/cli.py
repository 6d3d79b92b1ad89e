"""`metering dashboards push|export`: the Grafana dashboards, provisioned.

    metering dashboards push --url URL --token TOKEN [--folder F] [--datasource-uid U]
    metering dashboards export DIR [--datasource-uid U]

Neither reads the service's stores or settings: the dashboards query ClickHouse through
Grafana's ClickHouse data source, named by its UID.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from metering.dashboards import DEFAULT_DATASOURCE_UID, DEFAULT_FOLDER


def add_parser(commands: Any) -> None:
    """Add `dashboards` to the `metering` command's subparsers."""
    parser = commands.add_parser("dashboards", help="push or export the Grafana dashboards")
    actions = parser.add_subparsers(dest="dashboards_command", required=True)
    push = actions.add_parser(
        "push",
        help="create or update the dashboards in a Grafana (HTTP API)",
        description="Create the folder if missing and save every dashboard into it, "
        "overwriting the previous version (same UIDs).",
    )
    push.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://grafana:3000")
    push.add_argument(
        "--token", required=True, help="a service account token that may write dashboards"
    )
    push.add_argument("--folder", default=DEFAULT_FOLDER, help="folder title (%(default)s)")
    _datasource_argument(push)
    export = actions.add_parser(
        "export",
        help="write the dashboards as JSON files for Grafana's file provisioning",
    )
    export.add_argument("dir", type=Path, help="directory to write <uid>.json files into")
    _datasource_argument(export)


def _datasource_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--datasource-uid",
        default=DEFAULT_DATASOURCE_UID,
        help="UID of the ClickHouse data source (grafana-clickhouse-datasource) "
        "in Grafana (%(default)s)",
    )


def dashboards_command(args: argparse.Namespace) -> int:
    from metering.dashboards import provision

    if args.dashboards_command == "export":
        for path in provision.export(args.dir, args.datasource_uid):
            print(path)
        return 0
    from grafana_client.client import GrafanaException

    try:
        pushed = provision.push(args.url, args.token, args.folder, args.datasource_uid)
    except (GrafanaException, OSError) as exc:  # HTTP errors; refused, timed out
        print(f"metering dashboards: push to {args.url} failed: {exc}", file=sys.stderr)
        return 1
    verb = "created" if pushed.folder_created else "found"
    print(f"folder {args.folder!r} ({verb}, uid {pushed.folder_uid})")
    for uid, url in pushed.dashboards:
        print(f"  {uid}\t{url}")
    return 0
