"""What `POST /v1/events` answers for inputs a careless gateway sends: trailing newlines
in identifiers, and an NDJSON line that holds two events."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi.testclient import TestClient

from tests.ingest.helpers import event


def send(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> Any:
    return client.post(
        "/v1/events",
        content=msgspec.json.encode({"events": events}),
        headers={**headers, "content-type": "application/json"},
    )


def test_trailing_newline_breaks_the_character_set(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    response = send(client, admin_headers, [event(1, tenant_id="acme\n", provider="cohere\n")])
    assert response.json()["rejected"][0]["errors"] == [
        "tenant_id: must contain only [A-Za-z0-9_.:-]",
        "provider: must contain only [a-z0-9_-]",
    ]


def test_ndjson_line_with_two_events_is_rejected(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    line = msgspec.json.encode(event(1)) + b"," + msgspec.json.encode(event(2))
    body = msgspec.json.encode(event(0)) + b"\n" + line + b"\n"
    response = client.post(
        "/v1/events",
        content=body,
        headers={**admin_headers, "content-type": "application/x-ndjson"},
    )
    result = response.json()
    assert result["accepted"] == 1
    assert [r["index"] for r in result["rejected"]] == [1]
    assert result["rejected"][0]["errors"][0].startswith("event: not valid JSON")
