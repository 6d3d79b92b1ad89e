"""The one error shape (shared/CONTRACT.md "Errors"): every 4xx and 5xx of the JSON API,
unknown paths and methods and unhandled exceptions included, answers
`{"error": "<field>: <rule>", "errors": [...]}`; invalid input is 400, never 422; a 405
carries `Allow`; the OpenAPI schema documents it."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient

from metering.auth.deps import Reader
from metering.errors import MAX_ERRORS, error_body
from metering.services import Services
from tests.conftest import ADMIN_TOKEN


def assert_error_shape(body: Any) -> None:
    assert set(body) == {"error", "errors"}
    assert isinstance(body["errors"], list) and 1 <= len(body["errors"]) <= MAX_ERRORS
    assert all(isinstance(e, str) for e in body["errors"])
    assert body["error"] == body["errors"][0]
    assert ": " in body["error"], "each error reads <field>: <rule>"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_unknown_path_is_404_in_the_shape(
    client: TestClient, admin_headers: dict[str, str], method: str
) -> None:
    response = client.request(method, "/v1/no-such-thing", headers=admin_headers)
    assert response.status_code == 404
    assert response.json() == {
        "error": "path: no endpoint /v1/no-such-thing",
        "errors": ["path: no endpoint /v1/no-such-thing"],
    }


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/api-keys", "GET, POST"),
        ("PATCH", "/v1/api-keys", "GET, POST"),
        ("OPTIONS", "/v1/api-keys", "GET, POST"),
        ("GET", "/v1/api-keys/key_0", "DELETE"),
        ("GET", "/v1/events", "POST"),
        ("DELETE", "/healthz", "GET, HEAD"),
    ],
)
def test_unsupported_method_is_405_with_every_allowed_method(
    client: TestClient, admin_headers: dict[str, str], method: str, path: str, allow: str
) -> None:
    response = client.request(method, path, headers=admin_headers)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json()["errors"] == [f"method: {method} is not allowed on {path}"]


def test_invalid_body_is_400_never_422(client: TestClient, admin_headers: dict[str, str]) -> None:
    response = client.post("/v1/api-keys", json={"scopes": ["owner"]}, headers=admin_headers)
    assert response.status_code == 400
    assert_error_shape(response.json())
    assert response.json()["error"].startswith("scopes[0]: ")

    response = client.post(
        "/v1/api-keys",
        content=b'{"scopes": [',
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["errors"] == ["body: not valid JSON"]

    response = client.post("/v1/api-keys", headers=admin_headers)
    assert response.status_code == 400
    assert_error_shape(response.json())


def test_at_most_100_errors_are_listed(client: TestClient, admin_headers: dict[str, str]) -> None:
    response = client.post("/v1/api-keys", json={"scopes": ["owner"] * 150}, headers=admin_headers)
    assert response.status_code == 400
    body = response.json()
    assert_error_shape(body)
    assert len(body["errors"]) == MAX_ERRORS
    assert body["errors"][99].startswith("scopes[99]: ")
    assert error_body([f"x: {i}" for i in range(150)])["errors"] == [f"x: {i}" for i in range(100)]


def test_auth_errors_are_in_the_shape(client: TestClient, admin_headers: dict[str, str]) -> None:
    missing = client.get("/v1/api-keys")
    assert missing.status_code == 401
    assert_error_shape(missing.json())
    unknown = client.get("/v1/api-keys", headers=bearer("mk_nope"))
    assert unknown.status_code == 401
    assert_error_shape(unknown.json())
    ingest = client.post("/v1/api-keys", json={"scopes": ["ingest"]}, headers=admin_headers)
    denied = client.get("/v1/api-keys", headers=bearer(ingest.json()["key"]))
    assert denied.status_code == 403
    assert_error_shape(denied.json())


def _route_app(client: TestClient) -> FastAPI:
    app = client.app
    assert isinstance(app, FastAPI)
    return app


def test_unhandled_exception_is_500_in_the_shape_without_details(client: TestClient) -> None:
    app = _route_app(client)

    @app.get("/v1/test-boom")
    def boom() -> None:
        raise RuntimeError("secret detail: password=hunter2")

    # A client that does not re-raise, as a real server answers (the lifespan already ran).
    answering = TestClient(app, raise_server_exceptions=False)
    response = answering.get("/v1/test-boom")
    assert response.status_code == 500
    assert response.json() == {
        "error": "server: internal error",
        "errors": ["server: internal error"],
    }
    assert "hunter2" not in response.text


def test_another_tenants_data_is_403_through_a_read_route(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    """Principal.tenant_scope's refusal reaches the client as 403 in the error shape (it
    answered 500 when it was a bare PermissionError). The read routes land later; this
    one is registered by the test, written the way they will be."""
    app = _route_app(client)

    @app.get("/v1/test-tenant-scope")
    def read(principal: Reader, tenant_id: Annotated[str | None, Query()] = None) -> dict[str, Any]:
        return {"tenant_id": principal.tenant_scope(tenant_id)}

    created = client.post(
        "/v1/api-keys", json={"scopes": ["read"], "tenant_id": "acct-1"}, headers=admin_headers
    )
    key = bearer(created.json()["key"])
    assert client.get("/v1/test-tenant-scope", headers=key).json() == {"tenant_id": "acct-1"}
    own = client.get("/v1/test-tenant-scope", params={"tenant_id": "acct-1"}, headers=key)
    assert own.json() == {"tenant_id": "acct-1"}

    response = client.get("/v1/test-tenant-scope", params={"tenant_id": "acct-2"}, headers=key)
    assert response.status_code == 403
    assert response.json() == {
        "error": "tenant_id: this key may read only its own tenant's data",
        "errors": ["tenant_id: this key may read only its own tenant's data"],
    }
    admin = client.get(
        "/v1/test-tenant-scope", params={"tenant_id": "acct-2"}, headers=admin_headers
    )
    assert admin.json() == {"tenant_id": "acct-2"}


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_head_answers_like_get(client: TestClient, path: str) -> None:
    get = client.get(path)
    head = client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.headers["content-type"] == get.headers["content-type"]


def test_openapi_documents_the_error_shape(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    error = components["Error"]
    assert set(error["required"]) == {"error", "errors"}
    assert error["properties"]["errors"]["maxItems"] == MAX_ERRORS
    assert "HTTPValidationError" not in components and "ValidationError" not in components
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            if not path.startswith("/v1/"):
                continue
            if path != "/v1/stripe/webhook":  # Stripe signs its calls: no bearer token
                assert {"401", "403"} <= set(responses), (method, path)
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    media = response["content"]["application/json"]
                    assert media["schema"] == error_ref, (method, path, status)
    api_keys = schema["paths"]["/v1/api-keys"]
    assert "400" in api_keys["post"]["responses"]
    assert "404" in schema["paths"]["/v1/api-keys/{key_id}"]["delete"]["responses"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_bodies_read_whole_are_bounded(client: TestClient) -> None:
    """Every endpoint but ingest reads its body whole: past 1 MiB it is a 413 in the error
    shape, declared or chunked, without reading the rest; ingest keeps its 16 MiB."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    big = b"{" + b" " * (1024 * 1024) + b"}"
    for path in ("/v1/budgets", "/v1/prices", "/v1/authorize", "/dashboard/session"):
        r = client.post(path, content=big, headers=headers)
        assert r.status_code == 413, path
        assert r.json() == {"error": "body: at most 1048576 bytes", "errors": [r.json()["error"]]}

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b" " * 65536

    assert client.post("/v1/budgets", content=chunks(), headers=headers).status_code == 413
    events = [{"event_id": f"b{i}", "pad": "x" * 200} for i in range(8000)]
    r = client.post("/v1/events", json={"events": events}, headers=headers)
    assert r.status_code == 202  # 1.9 MB: ingest's own limits (items rejected, not the body)
