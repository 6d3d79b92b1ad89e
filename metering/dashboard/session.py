"""Dashboard sign-in: a signed session cookie instead of the bearer token.

The cookie never holds the token. It holds who signed in (`admin` or an API key's id), an
expiry, and an HMAC-SHA256 over both with a key derived from the admin token, so it cannot
be forged and is void when the admin token changes. A key's cookie is re-checked against
the database on every page (a revoked key's session ends at once). `HttpOnly` keeps it from
scripts, `SameSite=Strict` from other sites' forms and links.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from sqlalchemy.orm import Session

from metering.auth.models import ApiKey
from metering.auth.service import ADMIN, Principal

COOKIE = "metering_session"
LIFETIME = 12 * 3600  # seconds


def _key(admin_token: str) -> bytes:
    return hmac.new(admin_token.encode(), b"metering dashboard session v1", hashlib.sha256).digest()


def issue(admin_token: str, principal: Principal, now: float | None = None) -> str:
    subject = "admin" if principal.kind == "admin" else str(principal.key_id)
    expires = int((now or time.time()) + LIFETIME)
    body = f"{subject}.{expires}"
    sig = hmac.new(_key(admin_token), body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{sig}"


def principal_of(
    session: Session, admin_token: str, cookie: str | None, now: float | None = None
) -> Principal | None:
    """The principal a session cookie stands for, or None (absent, forged, expired,
    revoked, or a key that may not read)."""
    if not cookie or len(cookie) > 200:
        return None
    parts = cookie.split(".")
    if len(parts) != 3:
        return None
    subject, expires, sig = parts
    expected = hmac.new(
        _key(admin_token), f"{subject}.{expires}".encode(), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(sig, expected):
        return None
    if not expires.isdigit() or int(expires) < (now or time.time()):
        return None
    if subject == "admin":
        return ADMIN
    row = session.get(ApiKey, subject)
    if row is None or row.revoked_at is not None:
        return None
    principal = Principal("key", frozenset(row.scopes), row.tenant_id, row.id)
    return principal if principal.has("read") else None
