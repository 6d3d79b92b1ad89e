"""FastAPI dependency of the relational store: one session per request.

Services never commit; the request boundary does (`session_scope`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Protocol, cast

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from metering.db.engine import session_scope


class SessionState(Protocol):
    """What a request's session needs of the running service."""

    sessions: sessionmaker[Session]


def get_session(request: Request) -> Iterator[Session]:
    state = cast(SessionState, request.app.state.services)
    with session_scope(state.sessions) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
