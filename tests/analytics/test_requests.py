"""`GET /v1/requests`: keyset pages over the stored events, filters, tenant scoping and
bad input, against chDB and the app."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from metering.analytics.log_routes import router
from metering.analytics.requests import Cursor, _first_step, _next_step
from metering.app import create_app, wait_ready
from metering.errors import ApiError
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event

NOW = datetime.now(UTC).replace(microsecond=0)


def build_app(settings: Settings) -> FastAPI:
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    if not any(getattr(r, "path", None) == "/v1/requests" for r in app.routes):
        app.include_router(router)  # until app.py includes it
    return app


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    app = build_app(settings)
    with TestClient(app) as test_client:
        wait_ready(app)
        yield test_client


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def ts(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).isoformat()


def post(api: TestClient, events: list[dict[str, Any]]) -> None:
    response = api.post("/v1/events", json={"events": events}, headers=ADMIN)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == len(events), response.json()


def get(api: TestClient, headers: dict[str, str] = ADMIN, /, **params: Any) -> Any:
    """GET /v1/requests; a 503 (the writer is over 1 s behind on a loaded machine: the
    contract's freshness barrier) is retried as its Retry-After says."""
    for _ in range(10):
        response = api.get("/v1/requests", params=params, headers=headers)
        if response.status_code != 503:
            return response
        time.sleep(float(response.headers["Retry-After"]))
    return response


def walk(api: TestClient, headers: dict[str, str] = ADMIN, /, **params: Any) -> list[str]:
    """Every event_id of a walk through next_cursor."""
    seen: list[str] = []
    cursor = None
    for _ in range(1000):
        query = dict(params, **({"cursor": cursor} if cursor else {}))
        response = get(api, headers, **query)
        assert response.status_code == 200, response.text
        body = response.json()
        seen += [e["event_id"] for e in body["requests"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("walk did not end")


def newest_first(events: list[dict[str, Any]]) -> list[str]:
    keyed = [(datetime.fromisoformat(e["timestamp"]), e["event_id"]) for e in events]
    return [event_id for _, event_id in sorted(keyed, reverse=True)]


def spread(n: int, prefix: str = "e", **overrides: Any) -> list[dict[str, Any]]:
    """n events over ~40 days (several walk steps), with groups of equal timestamps."""
    return [
        event(f"{prefix}{i:03d}", timestamp=ts(10 + (i // 3) * 1500), **overrides) for i in range(n)
    ]


def test_paging_never_skips_or_repeats(api: TestClient) -> None:
    events = spread(47)
    post(api, events)
    expected = newest_first(events)
    for limit in (1, 5, 47, 1000):
        assert walk(api, limit=limit, window="90d") == expected
    page = get(api, limit=47, window="90d").json()
    assert page["next_cursor"] is None  # exactly `limit` rows left: no empty last page


def test_paging_while_events_arrive(api: TestClient) -> None:
    events = spread(30)
    post(api, events)
    first = get(api, limit=10, window="90d").json()
    seen = [e["event_id"] for e in first["requests"]]
    # New traffic (after the walk's fixed `to`), and late events older than the cursor.
    post(api, [event(f"new{i}", timestamp=ts(0.1)) for i in range(5)])
    late = [event(f"late{i}", timestamp=ts(60 * 24 * 39 + i)) for i in range(3)]
    post(api, late)
    cursor = first["next_cursor"]
    pages = 1
    while cursor:
        response = get(api, limit=10, window="90d", cursor=cursor)
        assert response.status_code == 200, response.text
        body = response.json()
        seen += [e["event_id"] for e in body["requests"]]
        cursor = body["next_cursor"]
        post(api, [event(f"during{pages}", timestamp=ts(0.05))])
        pages += 1
    assert pages == 4
    assert len(seen) == len(set(seen))
    assert seen == newest_first(events + late)
    assert not [s for s in seen if s.startswith(("evt-new", "evt-during"))]
    # A new walk (no cursor) shows the events that arrived meanwhile, newest first.
    fresh_walk = walk(api, limit=7, window="90d")
    arrived = [s for s in fresh_walk if s.startswith(("evt-new", "evt-during"))]
    assert len(arrived) == 5 + pages - 1 and fresh_walk[: len(arrived)] == arrived
    assert fresh_walk[len(arrived) :] == newest_first(events + late)


def test_tenant_pages_read_by_hours_equal_brute_force(api: TestClient) -> None:
    # A tenant's pages are read through its events per hour (p_tenant_hourly). The
    # window starts and ends inside hours that hold the tenant's events on both sides
    # of its edges, so the edge hours' counts include rows outside the window, and
    # other tenants fill the same hours.
    to = NOW.replace(minute=0, second=0) - timedelta(minutes=20)
    start = to - timedelta(days=9, minutes=17)
    mine: list[dict[str, Any]] = []
    for i in range(60):
        minutes = (i % 7) * 2 + (i // 7) * 1440 + (i % 3) * 61
        mine.append(
            event(
                f"t{i:03d}",
                timestamp=(to + timedelta(minutes=10) - timedelta(minutes=minutes)).isoformat(),
                tenant_id="acct-t",
                provider=("cohere", "azure")[i % 2],
            )
        )
    mine += [
        event(
            f"t-old{i}",
            timestamp=(start - timedelta(minutes=i + 1)).isoformat(),
            tenant_id="acct-t",
        )
        for i in range(3)
    ]
    others = [
        event(
            f"o{i:03d}", timestamp=(to - timedelta(minutes=3 * i)).isoformat(), tenant_id="acct-o"
        )
        for i in range(200)
    ]
    post(api, mine + others)
    window = {"from": start.isoformat(), "to": to.isoformat()}
    inside = [e for e in mine if start <= datetime.fromisoformat(e["timestamp"]) < to]
    assert 30 < len(inside) < 60
    for limit in (1, 4, 25, 100):
        assert walk(api, limit=limit, tenant_id="acct-t", **window) == newest_first(inside)
    azure = [e for e in inside if e["provider"] == "azure"]
    assert walk(api, limit=3, tenant_id="acct-t", provider="azure", **window) == newest_first(azure)
    # A late event older than the cursor's position shows in a later page of the walk.
    first = get(api, limit=5, tenant_id="acct-t", **window).json()
    late = event("t-late", timestamp=(start + timedelta(minutes=1)).isoformat(), tenant_id="acct-t")
    post(api, [late])
    seen = [e["event_id"] for e in first["requests"]]
    seen += walk(api, limit=5, tenant_id="acct-t", cursor=first["next_cursor"], **window)
    assert seen == newest_first([*inside, late])


def test_event_as_stored(api: TestClient) -> None:
    full = event(
        "full",
        timestamp="2026-01-01T00:00:00.123456+02:00",
        api_key_id="key-9",
        region="eu-west",
        http_status=200,
        queries=3,
        output_tokens=7,
        latency_ms=12.25,
        fallbacks=[
            {
                "provider": "azure",
                "model": "m",
                "region": "us",
                "latency_ms": 5.5,
                "error_type": "timeout",
                "http_status": 504,
            },
            {"provider": "bedrock", "latency_ms": 1.0},
        ],
    )
    full["timestamp"] = ts(30)[:-6] + ".123456+02:00"  # an offset, microseconds
    bare = event("bare", timestamp=ts(20), status="error")
    post(api, [full, bare])
    rows = get(api, window="24h").json()["requests"]
    assert [r["event_id"] for r in rows] == ["evt-bare", "evt-full"]
    stored = rows[1]
    local = datetime.fromisoformat(full["timestamp"])
    assert stored["timestamp"] == local.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.123Z")
    assert stored == {
        "event_id": "evt-full",
        "timestamp": stored["timestamp"],
        "tenant_id": "acct-1",
        "project_id": "proj-1",
        "api_key_id": "key-9",
        "provider": "cohere",
        "model": "rerank-4-pro",
        "region": "eu-west",
        "status": "ok",
        "http_status": 200,
        "error_type": None,
        "queries": 3,
        "documents": 50,
        "input_tokens": 5000,
        "output_tokens": 7,
        "latency_ms": 12.25,
        "fallbacks": [
            {
                "provider": "azure",
                "model": "m",
                "region": "us",
                "latency_ms": 5.5,
                "error_type": "timeout",
                "http_status": 504,
            },
            {
                "provider": "bedrock",
                "model": None,
                "region": None,
                "latency_ms": 1.0,
                "error_type": None,
                "http_status": None,
            },
        ],
    }
    assert rows[0]["status"] == "error" and rows[0]["api_key_id"] is None
    assert rows[0]["region"] == "global" and rows[0]["fallbacks"] == []


def test_filters(api: TestClient) -> None:
    events = []
    for i in range(40):
        events.append(
            event(
                f"f{i:02d}",
                timestamp=ts(5 + i * 97),
                tenant_id=f"acct-{i % 2}",
                project_id=f"proj-{i % 3}",
                provider=("cohere", "azure")[i % 2 if i % 5 else 0],
                model=("rerank-3", "rerank-4-pro")[i % 4 == 0],
                status=("ok", "error")[i % 7 == 0],
            )
        )
    post(api, events)
    cases: list[dict[str, str]] = [
        {"tenant_id": "acct-1"},
        {"project_id": "proj-2"},
        {"provider": "azure"},
        {"model": "rerank-4-pro"},
        {"status": "error"},
        {"status": "ok", "provider": "cohere", "project_id": "proj-0"},
        {"tenant_id": "acct-0", "model": "rerank-3", "status": "ok"},
        {"provider": "nobody"},
    ]
    for filters in cases:
        expected = newest_first([e for e in events if all(e[k] == v for k, v in filters.items())])
        assert walk(api, limit=4, window="7d", **filters) == expected, filters
    # A window given by from/to is [from, to).
    start, end = events[10]["timestamp"], events[3]["timestamp"]
    assert walk(api, limit=3, **{"from": start, "to": end}) == newest_first(events[4:11])


def make_key(api: TestClient, tenant_id: str | None) -> dict[str, str]:
    body: dict[str, Any] = {"scopes": ["read"]}
    if tenant_id:
        body["tenant_id"] = tenant_id
    response = api.post("/v1/api-keys", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


def test_read_key_sees_only_its_tenant(api: TestClient) -> None:
    a = [event(f"a{i}", timestamp=ts(i + 1), tenant_id="tenant-a") for i in range(6)]
    b = [event(f"b{i}", timestamp=ts(i + 1.5), tenant_id="tenant-b") for i in range(6)]
    post(api, a + b)
    key_a = make_key(api, "tenant-a")
    assert walk(api, key_a, limit=4) == newest_first(a)
    assert walk(api, key_a, limit=4, tenant_id="tenant-a") == newest_first(a)
    for filters in ({"provider": "cohere"}, {"status": "ok"}, {"project_id": "proj-1"}):
        assert set(walk(api, key_a, limit=5, **filters)) == {e["event_id"] for e in a}
    forbidden = get(api, key_a, tenant_id="tenant-b")
    assert forbidden.status_code == 403
    assert forbidden.json()["error"].startswith("tenant_id: ")
    # The admin sees the platform; a cursor of its walk does not carry over to the key.
    assert walk(api, limit=5) == newest_first(a + b)
    admin_cursor = get(api, limit=2).json()["next_cursor"]
    reused = get(api, key_a, limit=2, cursor=admin_cursor)
    assert reused.status_code == 400 and reused.json()["error"].startswith("cursor: ")
    # An unbound read key is gateway-wide, like the admin.
    assert walk(api, make_key(api, None), limit=5) == newest_first(a + b)
    assert get(api, {"Authorization": "Bearer nope"}).status_code == 401


def test_bad_input_is_400_naming_the_field(api: TestClient) -> None:
    post(api, spread(5))
    cursor = get(api, limit=2, window="90d").json()["next_cursor"]
    forged = base64.urlsafe_b64encode(msgspec.json.encode([1, 5, "x", 9, 1, "h"])).decode()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cursor": "not-a-cursor!"}, "cursor: "),
        ({"cursor": "e30"}, "cursor: "),  # base64 of {}
        ({"cursor": forged}, "cursor: "),
        ({"cursor": "A" * 5000}, "cursor: "),
        ({"cursor": cursor, "window": "90d", "provider": "azure"}, "cursor: "),
        ({"cursor": cursor, "window": "30d"}, "cursor: "),
        ({"limit": 0}, "limit: must be between 1 and 1000"),
        ({"limit": 1001}, "limit: must be between 1 and 1000"),
        ({"limit": -3}, "limit: must be between 1 and 1000"),
        ({"limit": "ten"}, "limit: "),
        ({"status": "failed"}, "status: must be ok or error"),
        ({"from": ts(10), "to": ts(20)}, "from: must be before to"),
        ({"from": "yesterday"}, "from: "),
        ({"window": "1y"}, "window: "),
        ({"tenant_id": "a b"}, "tenant_id: "),
        ({"provider": "Cohere"}, "provider: "),
        ({"model": "m" * 129}, "model: "),
    ]
    for params, prefix in cases:
        response = get(api, **params)
        assert response.status_code == 400, (params, response.text)
        body = response.json()
        assert body["error"].startswith(prefix), (params, body)
        assert body["errors"][0] == body["error"]
    both = get(api, limit=0, status="x").json()["errors"]
    assert both == ["status: must be ok or error", "limit: must be between 1 and 1000"]
    # The cursor with its own filters still works after all that.
    assert get(api, limit=2, window="90d", cursor=cursor).status_code == 200


def test_cursor_round_trip_and_checks() -> None:
    start, end = 1_699_000_000_000, 1_701_000_000_000
    cursor = Cursor(1_700_000_000_123, "evt-1", start, end, "abc")
    assert Cursor.decode(cursor.encode(), "abc") == cursor
    with pytest.raises(ApiError, match="cursor: was issued for other filters"):
        Cursor.decode(cursor.encode(), "other")
    for bad in (
        Cursor(end + 5, "evt-1", start, end, "abc"),  # position outside its window
        Cursor(start, "", start, end, "abc"),  # no event id
        Cursor(start, "evt-1", start, start + 801 * 86_400_000, "abc"),  # window too long
    ):
        with pytest.raises(ApiError, match="cursor: not a cursor"):
            Cursor.decode(bad.encode(), "abc")


def test_steps_read_back_as_far_as_the_rows_found_say() -> None:
    end = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
    start = end - timedelta(days=30)
    midnight = datetime(2026, 3, 10, tzinfo=UTC)
    assert _first_step(start, end) == midnight
    assert _first_step(start, midnight) == midnight - timedelta(days=1)
    assert _first_step(end - timedelta(hours=2), end) == end - timedelta(hours=2)
    # 15.5 h gave 10 of 101 rows: twice the ~6 days the rest needs, from the day before.
    assert _next_step(start, end, midnight, 10, 101) == midnight - timedelta(days=12)
    # Nothing found: 8x the span read so far (whole days).
    assert _next_step(start, end, midnight, 0, 101) == midnight - timedelta(days=6)
    # Nearly done: still at least as far again as was read.
    assert _next_step(start, end, midnight, 100, 101) == midnight - timedelta(days=1)
    # Never before the window's start.
    assert _next_step(start, end, midnight, 1, 101) == start
