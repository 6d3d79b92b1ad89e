"""The auth matrix: 401 without or with an unknown/revoked token, 403 without the scope
or for another tenant, keys stored only as hashes."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from metering.auth.service import ADMIN, Principal, TenantForbidden
from metering.services import Services

PROTECTED = [
    ("POST", "/v1/events", {"events": []}),
    ("POST", "/v1/probes", {"probes": []}),
    ("POST", "/v1/api-keys", {"scopes": ["read"]}),
    ("GET", "/v1/api-keys", None),
]


def make_key(client: TestClient, admin_headers: dict[str, str], **body: object) -> dict[str, str]:
    response = client.post("/v1/api-keys", json=body, headers=admin_headers)
    assert response.status_code == 201, response.text
    created: dict[str, str] = response.json()
    return created


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_missing_token_is_401(client: TestClient, method: str, path: str, body: object) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "error": "authorization: missing bearer token (Authorization: Bearer <token>)",
        "errors": ["authorization: missing bearer token (Authorization: Bearer <token>)"],
    }


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_unknown_token_is_401(client: TestClient, method: str, path: str, body: object) -> None:
    for token in ("nope", "mk_not-a-real-key", "Basic abc"):
        response = client.request(method, path, json=body, headers=bearer(token))
        assert response.status_code == 401, token
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["errors"] == ["authorization: unknown or revoked token"]
    response = client.request(method, path, json=body, headers={"Authorization": "Basic abc"})
    assert response.status_code == 401


def test_scopes_matrix(client: TestClient, admin_headers: dict[str, str]) -> None:
    ingest = make_key(client, admin_headers, scopes=["ingest"])["key"]
    read = make_key(client, admin_headers, scopes=["read"])["key"]
    admin_key = make_key(client, admin_headers, scopes=["admin"])["key"]

    for key in (ingest, admin_key):
        assert (
            client.post("/v1/events", json={"events": []}, headers=bearer(key)).status_code == 202
        )
    denied = client.post("/v1/events", json={"events": []}, headers=bearer(read))
    assert denied.status_code == 403
    assert denied.json() == {
        "error": "authorization: this key lacks the ingest scope",
        "errors": ["authorization: this key lacks the ingest scope"],
    }

    for key in (ingest, read):
        assert client.get("/v1/api-keys", headers=bearer(key)).status_code == 403
        assert (
            client.post("/v1/api-keys", json={"scopes": ["admin"]}, headers=bearer(key)).status_code
            == 403
        )
    assert client.get("/v1/api-keys", headers=bearer(admin_key)).status_code == 200


def test_keys_are_stored_only_as_hashes(
    client: TestClient, services: Services, admin_headers: dict[str, str]
) -> None:
    created = make_key(client, admin_headers, scopes=["ingest"], name="gateway")
    key = created["key"]
    with services.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys")).mappings().all()
    assert len(rows) == 1
    row = dict(rows[0])
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert all(key not in str(value) for value in row.values())
    listed = client.get("/v1/api-keys", headers=admin_headers).json()["api_keys"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0] and key not in str(listed)


def test_revoked_key_is_refused_at_once(client: TestClient, admin_headers: dict[str, str]) -> None:
    created = make_key(client, admin_headers, scopes=["ingest"])
    assert (
        client.post("/v1/events", json={"events": []}, headers=bearer(created["key"])).status_code
        == 202
    )
    assert client.delete(f"/v1/api-keys/{created['id']}", headers=admin_headers).status_code == 204
    response = client.post("/v1/events", json={"events": []}, headers=bearer(created["key"]))
    assert response.status_code == 401
    listed = client.get("/v1/api-keys", headers=admin_headers).json()["api_keys"]
    assert listed[0]["revoked_at"] is not None
    for missing in ("key_missing", "key_" + "0" * 24):
        response = client.delete(f"/v1/api-keys/{missing}", headers=admin_headers)
        assert response.status_code == 404
        assert response.json()["errors"] == ["key_id: no such API key"]


def test_only_read_keys_bind_to_a_tenant(client: TestClient, admin_headers: dict[str, str]) -> None:
    bound = make_key(client, admin_headers, scopes=["read"], tenant_id="acct-1")
    assert bound["tenant_id"] == "acct-1"
    response = client.post(
        "/v1/api-keys", json={"scopes": ["ingest"], "tenant_id": "acct-1"}, headers=admin_headers
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": 'tenant_id: only keys with scopes ["read"] can be bound to a tenant',
        "errors": ['tenant_id: only keys with scopes ["read"] can be bound to a tenant'],
    }
    response = client.post("/v1/api-keys", json={"scopes": ["owner"]}, headers=admin_headers)
    assert response.status_code == 400
    assert response.json()["errors"][0].startswith("scopes[0]:")
    response = client.post("/v1/api-keys", json={"scopes": []}, headers=admin_headers)
    assert response.status_code == 400
    assert response.json()["errors"][0].startswith("scopes:")


def test_tenant_bound_principal_sees_only_its_tenant() -> None:
    bound = Principal("key", frozenset({"read"}), tenant_id="acct-1", key_id="k")
    assert bound.tenant_scope(None) == "acct-1"
    assert bound.tenant_scope("acct-1") == "acct-1"
    with pytest.raises(TenantForbidden):
        bound.tenant_scope("acct-2")
    assert ADMIN.tenant_scope(None) is None
    assert ADMIN.tenant_scope("acct-2") == "acct-2"
    assert not bound.has("ingest") and not bound.has("admin") and bound.has("read")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_public_endpoints_need_no_token(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200
