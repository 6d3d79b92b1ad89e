"""FastAPI dependencies of auth: the caller (`Principal`) from the bearer token.

Route signatures stay short through `Annotated` aliases (`Admin`, `Ingest`, `Reader`,
`IngestOrAdmin`). What the dependencies need of the running service is the `AuthState`
protocol (the composition root, `metering.services.Services`, provides it), so no route
module imports the composition root.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Protocol, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from metering.auth.service import KeyCache, Principal, resolve
from metering.errors import ApiError


class AuthState(Protocol):
    """What auth needs of the running service."""

    admin_token: str
    key_cache: KeyCache
    sessions: sessionmaker[Session]


async def auth_state(request: Request) -> AuthState:
    return cast(AuthState, request.app.state.services)


AuthStateDep = Annotated[AuthState, Depends(auth_state)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
# Declares the bearer scheme in the OpenAPI schema; the checks are get_principal's.
_bearer = HTTPBearer(auto_error=False, description="the admin token or an API key")


def _lookup(state: AuthState, token: str) -> Principal | None:
    session = state.sessions()
    try:
        return resolve(session, state.admin_token, token)
    finally:
        session.close()


async def get_principal(
    state: AuthStateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, from `Authorization: Bearer`. Async with a short-lived cache: the
    ingest path neither hops to a thread nor queries the database per request."""
    token = credentials.credentials.strip() if credentials is not None else ""
    return await _principal_for(state, token)


async def _principal_for(state: AuthState, token: str) -> Principal:
    if not token:
        raise ApiError(
            401,
            "authorization: missing bearer token (Authorization: Bearer <token>)",
            _UNAUTHORIZED,
        )
    cache = state.key_cache
    principal = cache.get(token)
    if principal is None:
        if cache.unknown(token):
            raise unknown_token()
        principal = await run_in_threadpool(_lookup, state, token)
        if principal is None:
            cache.put_unknown(token)
            raise unknown_token()
        cache.put(token, principal)
    return principal


def unknown_token() -> ApiError:
    """The 401 for a token that is no key (unknown, or revoked)."""
    return ApiError(401, "authorization: unknown or revoked token", _UNAUTHORIZED)


async def caller(state: AuthState, request: Request) -> Principal:
    """`get_principal` for routes that take no FastAPI dependencies (the hot paths)."""
    return await principal_of(state, request.headers.get("authorization", ""))


def known_unknown(state: AuthState, header: str) -> bool:
    """Whether the header's token was found to be no key lately: `unknown_token` then
    answers it with no database lookup."""
    token = bearer_token(header)
    return bool(token) and state.key_cache.unknown(token)


def bearer_token(header: str) -> str:
    """The token of an `Authorization: Bearer <token>` header's value, else ""."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def principal_of(state: AuthState, header: str) -> Principal:
    """`get_principal` from the `Authorization` header's value (plain ASGI paths)."""
    return await _principal_for(state, bearer_token(header))


def cached_principal(state: AuthState, header: str) -> Principal | None:
    """`principal_of` when it needs no database lookup (the key was resolved lately);
    None when it does, or when the answer is an error."""
    token = bearer_token(header)
    return state.key_cache.get(token) if token else None


def require(*scopes: str) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency admitting principals with any of `scopes` (admin has them all)."""

    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not any(principal.has(scope) for scope in scopes):
            raise ApiError(403, f"authorization: this key lacks the {' or '.join(scopes)} scope")
        return principal

    return check


Admin = Annotated[Principal, Depends(require("admin"))]
Ingest = Annotated[Principal, Depends(require("ingest"))]
Reader = Annotated[Principal, Depends(require("read"))]
IngestOrAdmin = Annotated[Principal, Depends(require("ingest", "admin"))]
