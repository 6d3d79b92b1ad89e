"""The API key cache: a lookup that raced a revocation cannot cache the revoked key."""

from __future__ import annotations

from metering.auth.service import KeyCache, Principal


def test_revoked_key_is_not_cached_by_a_racing_lookup() -> None:
    cache = KeyCache()
    principal = Principal("key", frozenset({"ingest"}), None, "key_1")
    cache.forget_key("key_1")  # revoked while a lookup was in flight...
    cache.put("mk_secret", principal)  # ...which then tries to cache it
    assert cache.get("mk_secret") is None
