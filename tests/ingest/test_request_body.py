"""How the ingest endpoints take a request body: gzip (bounded, 16 MiB decompressed),
other encodings 415, the process-wide budget of body bytes in flight (503 +
Retry-After), a client that hangs up mid-body (499, no traceback), and the OpenAPI
description of all of it."""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient

from metering.app import create_app, wait_ready
from metering.ingest import routes
from metering.services import Services
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event, stored_count


def post(client: TestClient, headers: dict[str, str], body: bytes, **extra: str) -> Any:
    return client.post(
        "/v1/events",
        content=body,
        headers={**headers, "content-type": "application/json", **extra},
    )


def assert_error_shape(response: Any, status: int, first: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "errors"}
    assert body["error"].startswith(first) and body["errors"][0] == body["error"]


@pytest.mark.parametrize("ndjson", [False, True])
def test_gzip_body_is_accepted(
    client: TestClient, admin_headers: dict[str, str], services: Services, ndjson: bool
) -> None:
    events = [event(i) for i in range(300)]
    if ndjson:
        raw = b"\n".join(msgspec.json.encode(e) for e in events)
        extra = {"content-type": "application/x-ndjson"}
    else:
        raw = msgspec.json.encode({"events": events})
        extra = {}
    response = post(
        client, admin_headers, gzip.compress(raw), **{"content-encoding": "gzip", **extra}
    )
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 300, "duplicates": 0, "rejected": []}
    assert stored_count(services) == (300, 300)


def test_gzip_limit_applies_to_the_decompressed_size(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    events = msgspec.json.encode({"events": [event(1)]})
    bomb = gzip.compress(events[:-1] + b', "pad": "' + b" " * (64 * 1024 * 1024) + b'"}')
    assert len(bomb) < 128 * 1024
    response = post(client, admin_headers, bomb, **{"content-encoding": "gzip"})
    assert_error_shape(
        response, 413, "body: must be at most 16777216 bytes (16 MiB) once decompressed"
    )


def test_gzip_body_under_the_limit_once_decompressed_is_fine(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    events = msgspec.json.encode({"events": [event(1)]})
    padded = events[:-1] + b', "pad": "' + b" " * (15 * 1024 * 1024) + b'"}'
    response = post(client, admin_headers, gzip.compress(padded), **{"content-encoding": "gzip"})
    assert response.json() == {"accepted": 1, "duplicates": 0, "rejected": []}


@pytest.mark.parametrize(
    "body",
    [b"not gzip at all", gzip.compress(b'{"events": []}')[:-12]],
    ids=["garbage", "truncated"],
)
def test_broken_gzip_is_400(client: TestClient, admin_headers: dict[str, str], body: bytes) -> None:
    response = post(client, admin_headers, body, **{"content-encoding": "gzip"})
    assert_error_shape(response, 400, "body: not valid gzip")


@pytest.mark.parametrize("encoding", ["br", "deflate", "gzip, br", "compress"])
def test_other_encodings_are_415(
    client: TestClient, admin_headers: dict[str, str], encoding: str
) -> None:
    response = post(client, admin_headers, b'{"events": []}', **{"content-encoding": encoding})
    assert_error_shape(response, 415, "content-encoding: must be gzip or identity")


def test_identity_encoding_is_fine(client: TestClient, admin_headers: dict[str, str]) -> None:
    response = post(client, admin_headers, b'{"events": []}', **{"content-encoding": "identity"})
    assert response.status_code == 202


@pytest.fixture
def small_budget_client(settings: Settings) -> Iterator[TestClient]:
    small = settings.model_copy(update={"ingest_body_budget_bytes": 1024 * 1024})
    app = create_app(small, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as test_client:
        wait_ready(app)
        yield test_client


def test_bodies_past_the_budget_wait_then_get_503(
    small_budget_client: TestClient,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = small_budget_client
    monkeypatch.setattr(routes, "BUDGET_WAIT_SECONDS", 0.05)
    body = msgspec.json.encode({"events": [event(i) for i in range(2_000)]})
    assert len(body) < 1024 * 1024
    assert post(client, admin_headers, body).json()["accepted"] == 2_000
    budget: routes.BodyBudget = client.app.state.ingest_body_budget  # type: ignore[attr-defined]
    assert budget.used == 0  # every request gave its share back
    assert budget.try_take(budget.limit - 1000)  # another request holds nearly all of it
    try:
        response = post(client, admin_headers, body)
        assert_error_shape(response, 503, "body: too many request bodies in flight")
        assert response.headers["retry-after"] == "1"
        gzipped = post(
            client, admin_headers, gzip.compress(b" " * 500 + body), **{"content-encoding": "gzip"}
        )
        assert_error_shape(gzipped, 503, "body: too many request bodies in flight")
    finally:
        budget.give_back(budget.limit - 1000)
    assert budget.used == 0
    again = post(client, admin_headers, msgspec.json.encode({"events": [event("x")]}))
    assert again.json()["accepted"] == 1


def test_a_body_larger_than_the_budget_passes_when_alone(
    small_budget_client: TestClient, admin_headers: dict[str, str]
) -> None:
    body = msgspec.json.encode({"events": [event(i) for i in range(5_000)]})
    assert len(body) > 1024 * 1024
    assert post(small_budget_client, admin_headers, body).json()["accepted"] == 5_000


def test_client_hanging_up_mid_body_is_499_without_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"events": [{"event_id": "a"', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/events",
        "raw_path": b"/v1/events",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"authorization", f"Bearer {ADMIN_TOKEN}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", b"100000"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    caplog.set_level(logging.DEBUG)
    portal = client.portal
    assert portal is not None
    portal.call(client.app, scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [499]
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    budget: routes.BodyBudget = client.app.state.ingest_body_budget  # type: ignore[attr-defined]
    assert budget.used == 0


def test_openapi_documents_encodings_and_error_answers(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/v1/events", "/v1/probes"):
        operation = schema["paths"][path]["post"]
        for status in ("400", "401", "403", "413", "415", "503"):
            content = operation["responses"][status]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Error"}, (path, status)
        assert "Retry-After" in operation["responses"]["503"]["headers"]
        [parameter] = [p for p in operation["parameters"] if p["name"] == "Content-Encoding"]
        assert parameter["in"] == "header"
        # The documented values are exactly those served without a 415 (codings are
        # case-insensitive; x-gzip is gzip's old name; empty means none).
        accepted = re.compile(parameter["schema"]["pattern"])
        for value in ("gzip", "GZIP", "x-gzip", "identity", "Identity", ""):
            assert accepted.fullmatch(value), value
        for value in ("br", "deflate", "gzip, br", "gzipx", " "):
            assert not accepted.fullmatch(value), value
        assert "gzip" in parameter["description"] and "415" in parameter["description"]
