"""Provisioning: push the dashboards to a Grafana over its HTTP API, or export them as
files for Grafana's file provisioning.

`push` uses grafana-client: the folder is looked up by title (`GET /api/search`,
type dash-folder, an exact top-level match) and created when missing
(`POST /api/folders`); each dashboard is then saved with `POST /api/dashboards/db`,
`overwrite: true` and the folder's UID, so a re-push replaces the dashboards in place
(same UIDs) instead of failing on a version conflict or creating copies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metering.dashboards.build import dashboards

TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Pushed:
    folder_uid: str
    folder_created: bool
    dashboards: tuple[tuple[str, str], ...]  # (uid, url) as Grafana answered


def _find_folder(api: Any, title: str) -> str | None:
    hits = api.search.search_dashboards(query=title, type_="dash-folder")
    for hit in hits or ():
        # Top level only: a nested folder of the same name is someone else's.
        if hit.get("title") == title and not hit.get("folderUid"):
            return str(hit["uid"])
    return None


def push(url: str, token: str, folder: str, datasource_uid: str) -> Pushed:
    """Create-or-get the folder, then save every dashboard into it (overwrite)."""
    from grafana_client.api import GrafanaApi

    api = GrafanaApi.from_url(url, credential=token, timeout=TIMEOUT_SECONDS)
    folder_uid = _find_folder(api, folder)
    created = folder_uid is None
    if folder_uid is None:
        folder_uid = str(api.folder.create_folder(folder)["uid"])
    saved = []
    for model in dashboards(datasource_uid):
        answer = api.dashboard.update_dashboard(
            {
                "dashboard": {**model, "id": None},
                "folderUid": folder_uid,
                "overwrite": True,
                "message": "metering dashboards push",
            }
        )
        saved.append((str(answer.get("uid", model["uid"])), str(answer.get("url", ""))))
    return Pushed(folder_uid, created, tuple(saved))


def export(directory: Path, datasource_uid: str) -> Sequence[Path]:
    """One `<uid>.json` per dashboard: the JSON model file provisioning reads."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for model in dashboards(datasource_uid):
        path = directory / f"{model['uid']}.json"
        path.write_text(json.dumps(model, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written
