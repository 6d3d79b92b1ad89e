"""`metering dashboards export DIR`: one JSON file per dashboard that Grafana's file
provisioning accepts, and the copies kept in the repository's dashboards/ folder are
exactly what the code generates (they cannot drift)."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

from metering.cli import main
from metering.dashboards.build import BOARDS, GRID_WIDTH
from metering.dashboards.query import PLUGIN_TYPE

REPOSITORY_COPIES = Path(__file__).resolve().parents[2] / "dashboards"


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def _check_provisionable(model: dict[str, Any], datasource_uid: str) -> None:
    assert isinstance(model["uid"], str) and 0 < len(model["uid"]) <= 40
    assert isinstance(model["title"], str) and model["title"]
    assert isinstance(model["schemaVersion"], int)
    assert "id" not in model or model["id"] is None  # provisioning keys on uid
    panels = model["panels"]
    assert panels
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids)
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= GRID_WIDTH and pos["h"] > 0
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": PLUGIN_TYPE, "uid": datasource_uid}
            assert target["editorType"] == "sql" and target["rawSql"]
            assert target["format"] == (0 if panel["type"] == "timeseries" else 1)
    for a, b in combinations(panels, 2):
        assert not _overlap(a["gridPos"], b["gridPos"]), (a["title"], b["title"])


def test_export_writes_one_provisionable_file_per_dashboard(tmp_path: Path) -> None:
    out = tmp_path / "provisioning" / "dashboards"
    assert main(["dashboards", "export", str(out), "--datasource-uid", "ch-1"]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == sorted(f"{b.uid}.json" for b in BOARDS)
    for path in files:
        model = json.loads(path.read_text(encoding="utf-8"))
        assert path.stem == model["uid"]
        _check_provisionable(model, "ch-1")


def test_repository_copies_are_what_the_code_generates(tmp_path: Path) -> None:
    assert main(["dashboards", "export", str(tmp_path)]) == 0
    generated = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.json")}
    kept = {p.name: p.read_text(encoding="utf-8") for p in REPOSITORY_COPIES.glob("*.json")}
    assert kept == generated, "run `metering dashboards export dashboards/` and commit"
