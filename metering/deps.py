"""FastAPI dependencies: the services, a database session per request, the principal.

Route signatures stay short through `Annotated` aliases (`ServicesDep`, `SessionDep`,
`Admin`, `Ingest`, `Reader`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from metering.auth.service import Principal, resolve
from metering.db.engine import session_scope
from metering.services import Services


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with session_scope(services.sessions) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def _lookup(services: Services, token: str) -> Principal | None:
    session = services.sessions()
    try:
        return resolve(session, services.admin_token, token)
    finally:
        session.close()


async def get_principal(request: Request, services: ServicesDep) -> Principal:
    """The caller, from `Authorization: Bearer`. Async with a short-lived cache: the
    ingest path neither hops to a thread nor queries the database per request."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(
            401, "missing bearer token (Authorization: Bearer <token>)", headers=_UNAUTHORIZED
        )
    principal = services.key_cache.get(token)
    if principal is None:
        principal = await run_in_threadpool(_lookup, services, token)
        if principal is None:
            raise HTTPException(401, "unknown or revoked token", headers=_UNAUTHORIZED)
        services.key_cache.put(token, principal)
    return principal


def require(*scopes: str) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency admitting principals with any of `scopes` (admin has them all)."""

    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not any(principal.has(scope) for scope in scopes):
            raise HTTPException(403, f"this key lacks the {' or '.join(scopes)} scope")
        return principal

    return check


Admin = Annotated[Principal, Depends(require("admin"))]
Ingest = Annotated[Principal, Depends(require("ingest"))]
Reader = Annotated[Principal, Depends(require("read"))]
IngestOrAdmin = Annotated[Principal, Depends(require("ingest", "admin"))]
