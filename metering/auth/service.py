"""Bearer-token auth: the admin token and API keys with scopes and tenant binding.

Keys are random 256-bit secrets shown once at creation and stored only as SHA-256
hashes (a fast hash is right for high-entropy secrets; a slow KDF is for passwords).
Missing or unknown token: 401. A key without the scope: 403. A tenant-bound read key
asking for another tenant's data: 403 (404 for a specific resource), never the data.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.db import utcnow
from metering.auth.models import ApiKey

Scope = Literal["ingest", "read", "admin"]
ALL_SCOPES: frozenset[str] = frozenset({"ingest", "read", "admin"})
KEY_PREFIX = "mk_"


class TenantForbidden(PermissionError):
    """A tenant-bound key asked for another tenant's data; the app answers 403."""


@dataclass(frozen=True)
class Principal:
    kind: Literal["admin", "key"]
    scopes: frozenset[str]
    tenant_id: str | None = None
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def has(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes

    def tenant_scope(self, requested: str | None) -> str | None:
        """The tenant whose data a read may see: a bound key sees only its own tenant
        (TenantForbidden if it asks for another), the admin whatever it asks for."""
        if self.tenant_id is None:
            return requested
        if requested is not None and requested != self.tenant_id:
            raise TenantForbidden("this key may read only its own tenant's data")
        return self.tenant_id


ADMIN = Principal("admin", ALL_SCOPES)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEY_CACHE_SECONDS = 5.0


UNKNOWN_MAX_CHARS = 128  # longer tokens are never keys; they are not remembered


class KeyCache:
    """Recently resolved API keys, so the ingest path does not query the database on
    every request. Revoking through this process drops the entry at once; another
    replica's cache forgets a revoked key within KEY_CACHE_SECONDS.

    Tokens found to be no key are remembered for as long (`unknown`): a client that
    keeps sending a revoked or mistyped key costs a dictionary lookup per request, not a
    database query (about 1 ms of CPU each, measured on the authorize port). Remembering
    them is safe on any number of replicas: a token cannot become a key later, since a
    key's secret is drawn at its creation and shown only then."""

    def __init__(self, ttl: float = KEY_CACHE_SECONDS, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._unknown: dict[str, float] = {}  # token -> until when it is known to be none
        self._revoked: set[str] = set()  # so a lookup racing a revocation is not cached
        self._lock = threading.Lock()
        # Also told of each revocation (the authorize replica's cache, in its process).
        self.on_forget: Callable[[str], None] | None = None

    def get(self, token: str) -> Principal | None:
        entry = self._entries.get(token)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, token: str, principal: Principal) -> None:
        with self._lock:
            if principal.key_id in self._revoked:
                return
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[token] = (principal, time.monotonic() + self.ttl)

    def unknown(self, token: str) -> bool:
        """Whether `token` was found to be no key within the last `ttl` seconds."""
        until = self._unknown.get(token)
        return until is not None and until >= time.monotonic()

    def put_unknown(self, token: str) -> None:
        if len(token) > UNKNOWN_MAX_CHARS:
            return
        with self._lock:
            if len(self._unknown) >= self.max_entries:
                self._unknown.clear()
            self._unknown[token] = time.monotonic() + self.ttl

    def forget_key(self, key_id: str) -> None:
        with self._lock:
            self._revoked.add(key_id)
            for token in [t for t, (p, _) in self._entries.items() if p.key_id == key_id]:
                del self._entries[token]
        if self.on_forget is not None:
            self.on_forget(key_id)


def resolve(session: Session, admin_token: str, token: str) -> Principal | None:
    """The principal a bearer token stands for, or None."""
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return ADMIN
    if not token.startswith(KEY_PREFIX):
        return None
    row = session.execute(
        select(ApiKey).where(ApiKey.key_hash == hash_key(token), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None:
        return None
    return Principal("key", frozenset(row.scopes), row.tenant_id, row.id)


def create_key(
    session: Session, scopes: list[str], tenant_id: str | None, name: str | None
) -> tuple[ApiKey, str]:
    """Create a key; return the row and the secret (shown once, never stored)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id="key_" + uuid.uuid4().hex[:24],
        key_hash=hash_key(secret),
        prefix=secret[:10],
        scopes=sorted(set(scopes)),
        tenant_id=tenant_id,
        name=name,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, secret


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.execute(select(ApiKey).order_by(ApiKey.created_at)).scalars())


def revoke_key(session: Session, key_id: str) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None:
        return False
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return True
