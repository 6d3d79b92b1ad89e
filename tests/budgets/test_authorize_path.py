"""`POST /v1/authorize` is served by a plain ASGI path ahead of FastAPI
(metering.budgets.authorize.AuthorizeFastPath). It must answer exactly as the documented
FastAPI route does, count itself in /metrics, bound its body, and leave every other
request (other methods on the path too) to the app."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from metering.budgets.authorize import PATH, AuthorizeFastPath
from metering.services import Services
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DOLLAR = {"provider": "cohere", "model": "rerank-4-pro", "input_tokens": 4_000_000}


def _without_fast_path(app: FastAPI) -> None:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not AuthorizeFastPath]
    app.middleware_stack = None  # rebuilt on the next request


def _requests(ingest_key: str, read_key: str) -> list[tuple[dict[str, str], bytes]]:
    bearer = {"Authorization": f"Bearer {ingest_key}"}
    return [
        (H, b'{"tenant_id": "acct-1", "project_id": "proj-1"}'),  # denied: hard limit
        (H, b'{"tenant_id": "acct-1", "project_id": "proj-2"}'),
        (bearer, b'{"tenant_id": "acct-9"}'),  # no budget
        (bearer, b'{"tenant_id": "acct-1", "extra": [1, {"x": null}]}'),
        ({}, b'{"tenant_id": "a"}'),  # 401
        ({"Authorization": "Bearer nope"}, b'{"tenant_id": "a"}'),  # 401, unknown key
        ({"Authorization": "Basic abc"}, b'{"tenant_id": "a"}'),  # 401, other scheme
        ({"Authorization": "bearer   " + ingest_key + "  "}, b'{"tenant_id": "a"}'),
        ({"Authorization": f"Bearer {read_key}"}, b'{"tenant_id": "acct-1"}'),  # 403
        (H, b"{"),
        (H, b"[]"),
        (H, b"{}"),
        (H, b""),
        (H, b'{"tenant_id": 5}'),
        (H, b'{"tenant_id": "a b", "project_id": ""}'),
        (H, b'{"tenant_id": "' + b"a" * 65 + b'"}'),
        (H, b'{"tenant_id": "\xff"}'),
        (H, b'{"tenant_id": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        (H, b'{"tenant_id": "acct-1", "project_id": null}'),
        (H, b'{"tenant_id": "a"}' + b" " * (1024 * 1024)),  # 413
    ]


def _answers(client: TestClient, cases: list[tuple[dict[str, str], bytes]]) -> list[Any]:
    out = []
    for headers, body in cases:
        r = client.post(PATH, content=body, headers=headers)
        kept = {k: r.headers.get(k) for k in ("content-type", "www-authenticate", "retry-after")}
        out.append((r.status_code, r.content, kept))
    return out


def test_the_fast_path_answers_as_the_documented_route(client: TestClient) -> None:
    r = client.post(
        "/v1/budgets",
        json={"tenant_id": "acct-1", "project_id": "proj-1", "amount_usd": "1", "hard_limit": True},
        headers=H,
    )
    assert r.status_code == 201
    posted = client.post("/v1/events", json={"events": [event(1, **DOLLAR)]}, headers=H)
    assert posted.status_code == 202 and posted.json()["accepted"] == 1
    ingest = client.post("/v1/api-keys", json={"scopes": ["ingest"]}, headers=H).json()["key"]
    read = client.post(
        "/v1/api-keys", json={"scopes": ["read"], "tenant_id": "acct-1"}, headers=H
    ).json()["key"]
    cases = _requests(ingest, read)
    fast = _answers(client, cases)
    assert [status for status, _, _ in fast] == [
        *(200, 200, 200, 200),
        *(401, 401, 401, 200, 403),
        *(400,) * 9,
        200,
        413,
    ]
    assert fast[0][1].startswith(b'{"allowed":false,"reason":"budget ')
    _without_fast_path(client.app)  # type: ignore[arg-type]
    assert _answers(client, cases) == fast


def test_the_fast_path_counts_itself_in_metrics(client: TestClient) -> None:
    def counts() -> dict[str, float]:
        text = client.get("/metrics").text
        found = {}
        for status in ("200", "400", "401", "413"):
            pattern = (
                r'metering_http_requests_total\{method="POST",route="/v1/authorize",'
                rf'status="{status}"\}} (\S+)'
            )
            m = re.search(pattern, text)
            found[status] = float(m.group(1)) if m else 0.0
        m = re.search(
            r'metering_http_request_duration_seconds_count\{method="POST",'
            r'route="/v1/authorize"\} (\S+)',
            text,
        )
        found["timed"] = float(m.group(1)) if m else 0.0
        return found

    before = counts()
    client.post(PATH, json={"tenant_id": "a"}, headers=H)
    client.post(PATH, json={"tenant_id": "a"}, headers=H)
    client.post(PATH, content=b"{", headers=H)
    client.post(PATH, json={"tenant_id": "a"})
    client.post(PATH, content=b" " * (1024 * 1024 + 1), headers=H)
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {
        "200": 2,
        "400": 1,
        "401": 1,
        "413": 1,
        "timed": 5,
    }


def test_other_methods_and_paths_go_on_to_the_app(client: TestClient) -> None:
    r = client.get(PATH, headers=H)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"].startswith("method:") or "POST" in r.json()["error"]
    assert client.post(PATH + "/x", json={"tenant_id": "a"}, headers=H).status_code == 404


def test_a_chunked_body_past_the_limit_is_refused_unread(client: TestClient) -> None:
    sent = 0

    def chunks():  # type: ignore[no-untyped-def]
        nonlocal sent
        for _ in range(64):
            sent += 1
            yield b" " * 65536

    r = client.post(PATH, content=chunks(), headers=H)
    assert r.status_code == 413
    assert r.headers["connection"] == "close"
    assert r.json()["error"] == "body: at most 1048576 bytes"


def test_not_ready_is_503_with_retry_after(client: TestClient, services: Services) -> None:
    ledger = services.budgets.ledger
    ledger.ready = False
    try:
        r = client.post(PATH, json={"tenant_id": "a"}, headers=H)
    finally:
        ledger.ready = True
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == "budgets: spend is being rebuilt from ClickHouse; retry"


def test_a_client_gone_mid_body_gets_no_answer_and_counts_499(
    client: TestClient, services: Services
) -> None:
    app = client.app
    sent: list[dict[str, Any]] = []
    messages = iter(
        [
            {"type": "http.request", "body": b'{"tenant', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": PATH,
        "headers": [(b"authorization", f"Bearer {ADMIN_TOKEN}".encode())],
        "app": app,
    }

    def gone() -> float:
        m = re.search(
            r'metering_http_requests_total\{method="POST",route="/v1/authorize",'
            r'status="499"\} (\S+)',
            client.get("/metrics").text,
        )
        return float(m.group(1)) if m else 0.0

    before = gone()
    asyncio.run(AuthorizeFastPath(app)(scope, receive, send))
    assert sent == []
    assert gone() - before == 1
