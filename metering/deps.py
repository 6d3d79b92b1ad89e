"""FastAPI dependencies: the services, a database session per request, the principal.

Route signatures stay short through `Annotated` aliases (`ServicesDep`, `SessionDep`,
`Admin`, `Ingest`, `Reader`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from metering.auth import Principal, resolve
from metering.db import session_scope
from metering.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with session_scope(services.sessions) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def get_principal(request: Request, services: ServicesDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401, "missing bearer token (Authorization: Bearer <token>)", headers=_UNAUTHORIZED
        )
    session = services.sessions()
    try:
        principal = resolve(session, services.admin_token, token.strip())
    finally:
        session.close()
    if principal is None:
        raise HTTPException(401, "unknown or revoked token", headers=_UNAUTHORIZED)
    return principal


def require(*scopes: str) -> Callable[[Principal], Principal]:
    """A dependency admitting principals with any of `scopes` (admin has them all)."""

    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not any(principal.has(scope) for scope in scopes):
            raise HTTPException(403, f"this key lacks the {' or '.join(scopes)} scope")
        return principal

    return check


Admin = Annotated[Principal, Depends(require("admin"))]
Ingest = Annotated[Principal, Depends(require("ingest"))]
Reader = Annotated[Principal, Depends(require("read"))]
IngestOrAdmin = Annotated[Principal, Depends(require("ingest", "admin"))]
