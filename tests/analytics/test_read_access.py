"""Who sees what, and how fresh: every read endpoint and filter against two tenants'
read keys, and events acknowledged by ingest counted at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.ingest.helpers import event

NOW = datetime.now(UTC)


def _key(
    client: TestClient, admin: dict[str, str], tenant: str | None, scopes: list[str]
) -> dict[str, str]:
    body: dict[str, Any] = {"scopes": scopes}
    if tenant is not None:
        body["tenant_id"] = tenant
    r = client.post("/v1/api-keys", json=body, headers=admin)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


@pytest.fixture
def two_tenants(client: TestClient, admin_headers: dict[str, str]) -> dict[str, dict[str, str]]:
    events = []
    for i in range(40):
        tenant = "acct-a" if i % 2 else "acct-b"
        events.append(
            event(
                f"iso-{i}",
                timestamp=(NOW - timedelta(hours=i)).isoformat(),
                tenant_id=tenant,
                project_id=f"{tenant}-proj",
                provider="cohere" if i % 3 else "azure",
                status="error" if i % 7 == 0 else "ok",
                fallbacks=[{"provider": "bedrock", "latency_ms": 5}] if i % 5 == 0 else [],
            )
        )
    r = client.post("/v1/events", json={"events": events}, headers=admin_headers)
    assert r.status_code == 202 and r.json()["accepted"] == 40, r.text
    return {
        "a": _key(client, admin_headers, "acct-a", ["read"]),
        "b": _key(client, admin_headers, "acct-b", ["read"]),
    }


READS = [
    ("/v1/stats", {}),
    ("/v1/stats", {"window": "7d"}),
    ("/v1/usage", {}),
    ("/v1/usage", {"group_by": "tenant_id,project_id,provider,model", "granularity": "hour"}),
    ("/v1/usage", {"provider": "cohere"}),
    ("/v1/usage", {"model": "rerank-4-pro", "group_by": "tenant_id"}),
    ("/v1/usage", {"project_id": "acct-b-proj"}),
    ("/v1/providers", {}),
    ("/v1/requests", {}),
    ("/v1/requests", {"provider": "cohere", "status": "ok"}),
    ("/v1/requests", {"project_id": "acct-b-proj"}),
]


def _tenants_in(body: Any) -> set[str]:
    """Every tenant id named anywhere in an answer."""
    found: set[str] = set()
    if isinstance(body, dict):
        for key, value in body.items():
            if key == "tenant_id" and isinstance(value, str):
                found.add(value)
            found |= _tenants_in(value)
    elif isinstance(body, list):
        for item in body:
            found |= _tenants_in(item)
    return found


@pytest.mark.parametrize(("path", "params"), READS)
def test_a_read_key_never_sees_another_tenant(
    client: TestClient,
    admin_headers: dict[str, str],
    two_tenants: dict[str, dict[str, str]],
    path: str,
    params: dict[str, str],
) -> None:
    key_a = two_tenants["a"]
    own = client.get(path, params=params, headers=key_a)
    assert own.status_code == 200, own.text
    assert _tenants_in(own.json()) <= {"acct-a"}
    # Asking for tenant B's data by name is refused, never answered.
    other = client.get(path, params={**params, "tenant_id": "acct-b"}, headers=key_a)
    assert other.status_code == 403, other.text
    assert set(other.json()) == {"error", "errors"}
    # A's figures equal the admin's figures for tenant A.
    if path != "/v1/requests":
        as_admin = client.get(path, params={**params, "tenant_id": "acct-a"}, headers=admin_headers)
        assert as_admin.status_code == 200

        def figures(body: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in body.items() if k not in ("from", "to")}

        assert figures(own.json()) == figures(as_admin.json())


def test_a_read_key_sees_its_own_counts_only(
    client: TestClient, two_tenants: dict[str, dict[str, str]]
) -> None:
    a = client.get("/v1/stats", headers=two_tenants["a"]).json()
    b = client.get("/v1/stats", headers=two_tenants["b"]).json()
    assert (a["requests"], b["requests"], a["active_accounts"]) == (20, 20, 1)
    cohere_a = {
        p["provider"]: p
        for p in client.get("/v1/providers", headers=two_tenants["a"]).json()["providers"]
    }
    assert sum(p["requests"] for p in cohere_a.values()) == 20 + sum(
        1 for i in range(1, 40, 2) if i % 5 == 0
    )


def test_ingest_and_tenantless_read_keys(
    client: TestClient, admin_headers: dict[str, str], two_tenants: dict[str, dict[str, str]]
) -> None:
    ingest = _key(client, admin_headers, None, ["ingest"])
    assert client.get("/v1/stats", headers=ingest).status_code == 403
    assert client.get("/v1/stats").status_code == 401
    platform_reader = _key(client, admin_headers, None, ["read"])
    assert client.get("/v1/stats", headers=platform_reader).json()["requests"] == 40


def test_an_acknowledged_event_counts_at_once(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    # Freshness: each read waits for everything accepted before it to be stored. The
    # platform's figures too, whose whole hours are cached: odd events are late (in an
    # hour those figures hold), even ones new.
    def platform() -> int:
        r = client.get("/v1/stats", headers=admin_headers)
        assert r.status_code == 200, r.text
        return int(r.json()["requests"])

    before = platform()
    for i in range(5):
        at = datetime.now(UTC) - timedelta(hours=3 * (i % 2))
        body = event(f"fresh-{i}", timestamp=at.isoformat(), tenant_id="acct-f")
        r = client.post("/v1/events", json={"events": [body]}, headers=admin_headers)
        assert r.status_code == 202
        stats = client.get("/v1/stats", params={"tenant_id": "acct-f"}, headers=admin_headers)
        assert stats.json()["requests"] == i + 1
        assert platform() == before + i + 1
        usage = client.get(
            "/v1/usage",
            params={"tenant_id": "acct-f", "granularity": "hour"},
            headers=admin_headers,
        ).json()["series"]
        assert sum(row["requests"] for row in usage) == i + 1
