"""`metering dashboards push` against a local server implementing the Grafana endpoints
it calls: the folder is created or found, every dashboard is saved into it with
`overwrite`, the data source UID is on every panel, target and variable, and every
request carries the bearer token."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from metering.cli import main
from metering.dashboards.build import BOARDS
from metering.dashboards.query import PLUGIN_TYPE
from tests.dashboards.grafana_fake import FakeGrafana, serve

TOKEN = "glsa_test-token"


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    with serve(FakeGrafana(TOKEN)) as fake:
        yield fake


def _push(grafana: FakeGrafana, *extra: str, token: str = TOKEN) -> int:
    return main(["dashboards", "push", "--url", grafana.url, "--token", token, *extra])


def _saves(grafana: FakeGrafana) -> list[Any]:
    return [r.body for r in grafana.requests if r.path == "/api/dashboards/db"]


def _datasource_refs(model: dict[str, Any]) -> list[dict[str, Any]]:
    refs = []
    for panel in model["panels"]:
        if panel["type"] == "text":
            assert "targets" not in panel
            continue
        refs.append(panel["datasource"])
        assert panel["targets"], panel["title"]
        refs.extend(target["datasource"] for target in panel["targets"])
    refs.extend(v["datasource"] for v in model.get("templating", {}).get("list", []))
    return refs


def test_push_creates_the_folder_and_saves_every_dashboard(
    grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _push(grafana, "--datasource-uid", "ch-prod", "--folder", "Metering") == 0

    assert [(r.method, r.path) for r in grafana.requests] == [
        ("GET", "/api/search"),
        ("POST", "/api/folders"),
    ] + [("POST", "/api/dashboards/db")] * len(BOARDS)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in grafana.requests)
    search = grafana.requests[0].query
    assert search["type"] == ["dash-folder"] and search["query"] == ["Metering"]
    assert grafana.requests[1].body == {"title": "Metering"}

    saves = _saves(grafana)
    assert [s["dashboard"]["uid"] for s in saves] == [b.uid for b in BOARDS]
    assert [s["dashboard"]["title"] for s in saves] == [b.title for b in BOARDS]
    for save in saves:
        assert save["folderUid"] == "folder-1"
        assert save["overwrite"] is True
        assert save["dashboard"]["id"] is None  # matched by uid, never by a stale id
        refs = _datasource_refs(save["dashboard"])
        assert refs and all(ref == {"type": PLUGIN_TYPE, "uid": "ch-prod"} for ref in refs)
    tenant = next(s["dashboard"] for s in saves if s["dashboard"]["uid"] == "rerank-tenant")
    assert [v["name"] for v in tenant["templating"]["list"]] == ["tenant"]
    out = capsys.readouterr().out
    assert "folder 'Metering' (created, uid folder-1)" in out
    assert all(f"/d/{b.uid}/" in out for b in BOARDS)


def test_push_again_finds_the_folder_and_overwrites_in_place(grafana: FakeGrafana) -> None:
    grafana.folders[:] = [
        {"uid": "older", "title": "Rerank metering (old)"},
        {"uid": "nested", "title": "Rerank metering", "folderUid": "team"},
        {"uid": "top", "title": "Rerank metering"},
    ]
    assert _push(grafana) == 0
    assert _push(grafana) == 0

    assert not [r for r in grafana.requests if r.path == "/api/folders"]
    assert {s["folderUid"] for s in _saves(grafana)} == {"top"}
    assert len(_saves(grafana)) == 2 * len(BOARDS)
    assert sorted(grafana.dashboards) == sorted(b.uid for b in BOARDS)
    assert {d["version"] for d in grafana.dashboards.values()} == {2}
    default_refs = [ref for s in _saves(grafana) for ref in _datasource_refs(s["dashboard"])]
    assert {ref["uid"] for ref in default_refs} == {"clickhouse"}


def test_push_with_a_rejected_token_fails_with_a_message(
    grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _push(grafana, token="wrong") == 1
    assert "push to" in capsys.readouterr().err
    assert grafana.dashboards == {} and grafana.folders == []


def test_push_to_nothing_listening_fails_with_a_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        code = main(["dashboards", "push", "--url", f"http://127.0.0.1:{port}", "--token", TOKEN])
    assert code == 1
    assert "failed" in capsys.readouterr().err
