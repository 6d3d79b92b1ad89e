"""Bad input to the figures and the price book: 400 naming the field and the rule,
never a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

BAD_READS = [
    ("/v1/stats", {"window": "31d"}, "window"),
    ("/v1/stats", {"window": "7d", "from": "2026-01-01T00:00:00Z"}, "window"),
    ("/v1/stats", {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
    ("/v1/stats", {"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
    ("/v1/stats", {"from": "2026-01-01T00:00:00"}, "from"),  # no offset
    ("/v1/stats", {"from": "yesterday"}, "from"),
    ("/v1/stats", {"to": "2026-01-01"}, "to"),
    ("/v1/stats", {"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to"),
    ("/v1/stats", {"tenant_id": "a b"}, "tenant_id"),
    ("/v1/stats", {"to": "0004-01-06T04:00:01Z"}, "to"),
    ("/v1/stats", {"from": "2400-01-01T00:00:00Z"}, "from"),
    ("/v1/usage", {"group_by": "tenant_id,colour"}, "group_by"),
    ("/v1/usage", {"group_by": "model,model"}, "group_by"),
    ("/v1/usage", {"granularity": "week"}, "granularity"),
    ("/v1/providers", {"window": "1y"}, "window"),
    ("/v1/requests", {"cursor": "not-a-cursor"}, "cursor"),
    ("/v1/requests", {"limit": "0"}, "limit"),
    ("/v1/requests", {"limit": "1001"}, "limit"),
    ("/v1/incidents", {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
]


@pytest.mark.parametrize(("path", "params", "field"), BAD_READS)
def test_bad_read_is_400_naming_the_field(
    client: TestClient, admin_headers: dict[str, str], path: str, params: dict[str, str], field: str
) -> None:
    r = client.get(path, params=params, headers=admin_headers)
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert body["error"].startswith(f"{field}: "), body
    assert body["errors"][0] == body["error"]


GOOD_PRICE: dict[str, Any] = {
    "provider": "cohere",
    "model": "rerank-4-pro",
    "effective_from": "2026-06-01T00:00:00Z",
    "currency": "USD",
    "input_per_1m_tokens": "0.25",
    "output_per_1m_tokens": "0",
    "per_1k_doc_query_pairs": "0.20",
}
BAD_PRICES = [
    ({"input_per_1m_tokens": "-0.25"}, "input_per_1m_tokens"),
    ({"input_per_1m_tokens": "abc"}, "input_per_1m_tokens"),
    ({"input_per_1m_tokens": 0.25}, "input_per_1m_tokens"),  # a float: never
    ({"per_1k_doc_query_pairs": "1e3"}, "per_1k_doc_query_pairs"),
    ({"per_1k_doc_query_pairs": "NaN"}, "per_1k_doc_query_pairs"),
    ({"output_per_1m_tokens": "0.0000000000001"}, "output_per_1m_tokens"),  # 13 decimals
    ({"effective_from": "2026-06-01T00:00:00"}, "effective_from"),
    ({"effective_from": 0}, "effective_from"),
    ({"currency": "EUR"}, "currency"),
    ({"provider": "Cohere"}, "provider"),
    ({"provider": ""}, "provider"),
]


@pytest.mark.parametrize(("change", "field"), BAD_PRICES)
def test_bad_price_is_400_naming_the_field(
    client: TestClient, admin_headers: dict[str, str], change: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/prices", json={**GOOD_PRICE, **change}, headers=admin_headers)
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"].startswith(f"{field}: "), r.json()


def test_price_entries_are_never_edited(client: TestClient, admin_headers: dict[str, str]) -> None:
    first = client.post("/v1/prices", json=GOOD_PRICE, headers=admin_headers)
    assert first.status_code == 201, first.text
    again = client.post("/v1/prices", json=GOOD_PRICE, headers=admin_headers)
    assert (again.status_code, again.json()) == (200, first.json())
    other = client.post(
        "/v1/prices", json={**GOOD_PRICE, "input_per_1m_tokens": "0.26"}, headers=admin_headers
    )
    assert other.status_code == 409 and other.json()["error"].startswith("effective_from: ")
    listed = client.get("/v1/prices", headers=admin_headers).json()["prices"]
    assert [p["input_per_1m_tokens"] for p in listed if p["id"] == first.json()["id"]] == ["0.25"]
    # The default book from the seed page is there, from 1970.
    defaults = {
        (p["provider"], p["model"]): p for p in listed if p["effective_from"].startswith("1970")
    }
    assert defaults[("llmapi", "rerank-4-pro")]["input_per_1m_tokens"] == "0.05"
    assert defaults[("bedrock", "rerank-4-pro")]["input_per_1m_tokens"] == "0.3"
    assert defaults[("cohere", "rerank-3")]["per_1k_doc_query_pairs"] == "0.16"
    assert defaults[("azure", "text-embedding-3-large")]["per_1k_doc_query_pairs"] == "0.14"


def test_only_the_admin_posts_prices(client: TestClient, admin_headers: dict[str, str]) -> None:
    r = client.post("/v1/api-keys", json={"scopes": ["read"]}, headers=admin_headers)
    reader = {"Authorization": f"Bearer {r.json()['key']}"}
    assert client.post("/v1/prices", json=GOOD_PRICE, headers=reader).status_code == 403
    assert client.get("/v1/prices", headers=reader).status_code == 200
