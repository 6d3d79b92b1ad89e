"""Incidents: the run rule as a pure function, and `GET /v1/incidents` end to end with
probes posted through `POST /v1/probes`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metering.analytics.incidents import Incident, ProbeRow, detect
from metering.analytics.log_routes import router
from metering.app import create_app, wait_ready
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MIN = 60_000  # ms


def rows(pattern: str, provider: str = "cohere", region: str = "global") -> list[ProbeRow]:
    """One probe a minute: `x` failed, `.` ok."""
    return [
        ProbeRow(provider, region, i * MIN, f"{provider}-{region}-{i}", c == ".")
        for i, c in enumerate(pattern)
    ]


def test_two_failures_are_no_incident() -> None:
    assert detect(rows("..xx..xx.x")) == []


def test_three_failures_open_and_the_next_ok_closes() -> None:
    assert detect(rows("..xxx..")) == [Incident("cohere", "global", 2 * MIN, 5 * MIN, 3)]
    assert detect(rows(".xxxxxx.x")) == [Incident("cohere", "global", 1 * MIN, 7 * MIN, 6)]


def test_still_failing_is_open() -> None:
    assert detect(rows("xxxx")) == [Incident("cohere", "global", 0, None, 4)]
    assert detect(rows("..xx.xxx")) == [Incident("cohere", "global", 5 * MIN, None, 3)]


def test_each_region_and_provider_runs_separately() -> None:
    # Interleaved in time, each target fails only twice in a row: no incident.
    mixed = rows(".xx.", region="us") + rows("x.xx", region="eu") + rows("xx..", "azure", "us")
    assert detect(mixed) == []
    both = rows("xxx.", region="us") + rows(".xxx", region="eu")
    assert detect(both) == [
        Incident("cohere", "eu", 1 * MIN, None, 3),
        Incident("cohere", "us", 0, 3 * MIN, 3),
    ]


def test_order_of_input_does_not_matter_and_output_is_newest_first() -> None:
    probes = rows("xxx.xxxx.xxx") + rows("..xxx", "azure")
    found = detect(reversed(probes))
    assert found == detect(probes)
    assert [i.started_ms for i in found] == [9 * MIN, 4 * MIN, 2 * MIN, 0]


def test_equal_timestamps_order_failed_first() -> None:
    oks = [True, False, False, False]
    probes = [ProbeRow("cohere", "global", 0, f"p{i}", ok) for i, ok in enumerate(oks)]
    assert detect(probes) == [Incident("cohere", "global", 0, 0, 3)]


def test_overlap_with_a_window() -> None:
    closed = Incident("cohere", "global", 10, 20, 3)
    assert closed.overlaps(0, 11) and closed.overlaps(19, 30)
    assert not closed.overlaps(20, 30) and not closed.overlaps(0, 10)
    assert Incident("cohere", "global", 10, None, 3).overlaps(1000, 2000)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    if not any(getattr(r, "path", None) == "/v1/incidents" for r in app.routes):
        app.include_router(router)  # until app.py includes it
    with TestClient(app) as test_client:
        wait_ready(app)
        yield test_client


T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)


def at(minutes: int) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


def post_probes(api: TestClient, pattern: str, provider: str, region: str, start: int) -> None:
    probes = [
        {
            "probe_id": f"{provider}-{region}-{start + i}",
            "timestamp": at(start + i),
            "provider": provider,
            "region": region,
            "ok": c == ".",
            "latency_ms": 10.0,
        }
        for i, c in enumerate(pattern)
    ]
    response = api.post("/v1/probes", json={"probes": probes}, headers=ADMIN)
    assert response.status_code == 202 and response.json()["accepted"] == len(probes)


def incidents(api: TestClient, headers: dict[str, str] = ADMIN, /, **params: Any) -> Any:
    for _ in range(10):  # 503: the writer is over 1 s behind (a loaded machine); retry
        response = api.get("/v1/incidents", params=params, headers=headers)
        if response.status_code != 503:
            break
        time.sleep(float(response.headers["Retry-After"]))
    assert response.status_code == 200, response.text
    return response.json()["incidents"]


def test_incidents_end_to_end(api: TestClient) -> None:
    post_probes(api, "..xxxx..xx..", "cohere", "global", 0)  # 2-5 failed, 6 ok
    post_probes(api, "x.xxx", "cohere", "us-east", 0)  # 2-4 failed, still open
    post_probes(api, ".xxx.", "azure", "global", 100)  # 101-103, closed at 104
    key = api.post("/v1/api-keys", json={"scopes": ["read"], "tenant_id": "t1"}, headers=ADMIN)
    reader = {"Authorization": f"Bearer {key.json()['key']}"}
    everything = incidents(api, reader, window="7d")  # any reader sees provider health
    assert everything == [
        {
            "provider": "azure",
            "region": "global",
            "started_at": at(101).replace("+00:00", ".000Z"),
            "ended_at": at(104).replace("+00:00", ".000Z"),
            "failed_probes": 3,
        },
        {
            "provider": "cohere",
            "region": "us-east",
            "started_at": at(2).replace("+00:00", ".000Z"),
            "ended_at": None,
            "failed_probes": 3,
        },
        {
            "provider": "cohere",
            "region": "global",
            "started_at": at(2).replace("+00:00", ".000Z"),
            "ended_at": at(6).replace("+00:00", ".000Z"),
            "failed_probes": 4,
        },
    ]
    assert incidents(api, provider="azure", window="7d") == everything[:1]
    # A window starting inside a run still sees it whole (the lookback finds its start),
    # and one ending inside a run still sees how it ended.
    inside = incidents(api, **{"from": at(4), "to": at(5), "provider": "cohere"})
    assert inside == everything[1:]
    assert incidents(api, **{"from": at(102), "to": at(103)}) == everything[:2]  # us-east open
    # Windows before it started or after it ended do not list it.
    assert incidents(api, **{"from": at(104), "to": at(200), "provider": "azure"}) == []
    assert incidents(api, **{"from": at(-50), "to": at(2)}) == []


def test_incidents_bad_input(api: TestClient) -> None:
    for params, prefix in (
        ({"window": "2d"}, "window: "),
        ({"from": at(10), "to": at(5)}, "from: must be before to"),
        ({"provider": "Not A Provider"}, "provider: "),
        ({"to": "tomorrow"}, "to: "),
    ):
        response = api.get("/v1/incidents", params=params, headers=ADMIN)
        assert response.status_code == 400, (params, response.text)
        assert response.json()["error"].startswith(prefix)
    assert api.get("/v1/incidents").status_code == 401


def test_clickhouse_finds_the_same_incidents_as_the_rule(ch_client: Any) -> None:
    """`read_incidents` (runs found in SQL) against `detect` (the rule in Python) on random
    probe histories of several targets, read through windows cut at random places."""
    import random

    from metering.analytics.incidents import read_incidents
    from metering.analytics.window import Window
    from metering.clickhouse.migrations import migrate

    migrate(ch_client)
    rng = random.Random(11)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    probes: list[ProbeRow] = []
    for provider, region in (("cohere", "global"), ("azure", "us-east"), ("azure", "eu")):
        failing = False
        for i in range(400):
            if rng.random() < 0.08:
                failing = not failing
            ok = not failing if rng.random() > 0.1 else failing
            ts_ms = int((base + timedelta(seconds=30 * i)).timestamp() * 1000)
            probes.append(ProbeRow(provider, region, ts_ms, f"{provider}-{region}-{i}", ok))
    ch_client.insert(
        "uptime_probes",
        [
            [p.probe_id, datetime.fromtimestamp(p.ts_ms / 1000, UTC), p.provider, p.region, p.ok]
            for p in probes
        ],
        column_names=["probe_id", "timestamp", "provider", "region", "ok"],
    )
    for _ in range(12):
        a, b = sorted(rng.sample(range(0, 400 * 30), 2))
        window = Window(base + timedelta(seconds=a), base + timedelta(seconds=b))
        start_ms = int(window.start.timestamp() * 1000)
        end_ms = int(window.end.timestamp() * 1000)
        want = [i for i in detect(probes) if i.overlaps(start_ms, end_ms)]
        assert read_incidents(ch_client, window) == want
        azure = [i for i in want if i.provider == "azure"]
        assert read_incidents(ch_client, window, "azure") == azure
    assert any(detect(probes))
