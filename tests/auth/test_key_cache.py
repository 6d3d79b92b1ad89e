"""The API key cache: a lookup that raced a revocation cannot cache the revoked key;
tokens that are no key are remembered for a while, so sending one again costs no
database query."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from metering.auth import deps
from metering.auth.service import UNKNOWN_MAX_CHARS, KeyCache, Principal


def test_revoked_key_is_not_cached_by_a_racing_lookup() -> None:
    cache = KeyCache()
    principal = Principal("key", frozenset({"ingest"}), None, "key_1")
    cache.forget_key("key_1")  # revoked while a lookup was in flight...
    cache.put("mk_secret", principal)  # ...which then tries to cache it
    assert cache.get("mk_secret") is None


def test_unknown_tokens_are_remembered_for_the_ttl_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr("metering.auth.service.time.monotonic", lambda: now[0])
    cache = KeyCache(ttl=5.0, max_entries=3)
    assert not cache.unknown("mk_nope")
    cache.put_unknown("mk_nope")
    assert cache.unknown("mk_nope")
    assert cache.get("mk_nope") is None  # never a principal
    now[0] += 5.5
    assert not cache.unknown("mk_nope")  # looked up again after the ttl
    cache.put_unknown("mk_" + "x" * (UNKNOWN_MAX_CHARS - 2))  # too long to remember
    assert not cache.unknown("mk_" + "x" * (UNKNOWN_MAX_CHARS - 2))
    for n in range(4):  # at most max_entries: full, the remembered ones are dropped
        cache.put_unknown(f"mk_{n}")
    assert len(cache._unknown) <= 3
    assert cache.unknown("mk_3")


def test_a_revoked_key_sent_again_costs_one_database_lookup(
    client: TestClient, admin_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway still configured with a revoked key, or a mistyped one, keeps sending
    it: after the first 401 the rest are answered from memory, on the main port as on
    the authorize port (the same dependency)."""
    created = client.post("/v1/api-keys", json={"scopes": ["ingest"]}, headers=admin_headers)
    key = created.json()["key"]
    headers = {"Authorization": f"Bearer {key}"}
    assert client.post("/v1/events", json={"events": []}, headers=headers).status_code == 202
    revoked = client.delete(f"/v1/api-keys/{created.json()['id']}", headers=admin_headers)
    assert revoked.status_code == 204
    lookups: list[str] = []
    real = deps._lookup

    def counted(state: deps.AuthState, token: str) -> Principal | None:
        lookups.append(token)
        return real(state, token)

    monkeypatch.setattr(deps, "_lookup", counted)
    for token in (key, "mk_mistyped"):
        for _ in range(5):
            response = client.post(
                "/v1/events", json={"events": []}, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 401
            assert response.json()["errors"] == ["authorization: unknown or revoked token"]
    assert lookups == [key, "mk_mistyped"]
    # A key created afterwards works at once (its secret is new: nothing remembered it).
    fresh = client.post("/v1/api-keys", json={"scopes": ["ingest"]}, headers=admin_headers)
    fresh_headers = {"Authorization": f"Bearer {fresh.json()['key']}"}
    assert client.post("/v1/events", json={"events": []}, headers=fresh_headers).status_code == 202
