"""Real parts for the alert tests: a migrated database, a local HTTP receiver, alerts."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from billing.alerts import outbox
from billing.budgets.models import AlertDeliveryRow, BudgetAlertRow, BudgetRow
from metering.db import migrations
from metering.db.engine import make_engine, make_session_factory

SECRET = "s3cret-for-tests"


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on an empty database migrated to head (SQLite or PostgreSQL)."""
    engine = make_engine(database_url)
    migrations.upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def second_sessions(
    database_url: str, sessions: sessionmaker[Session]
) -> Iterator[sessionmaker[Session]]:
    """Another engine on the same database: what a second replica would have."""
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every request and answers `answer()`."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    answer: Callable[[], int] = lambda: 200
    location: str | None = None  # sent with a 3xx
    delay: float = 0.0

    def delivered(self) -> list[Received]:
        """The requests answered 2xx."""
        with self.lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def all(self) -> list[Received]:
        with self.lock:
            return list(self.requests)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        receiver = self.server.receiver
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if receiver.delay:
            time.sleep(receiver.delay)
        status = receiver.answer()
        with receiver.lock:
            receiver.requests.append(Received(self.path, dict(self.headers.items()), body, status))
        self.send_response(status)
        if 300 <= status < 400 and receiver.location:
            self.send_header("Location", receiver.location)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = _Server(("127.0.0.1", 0), _Handler)
    state = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}/hook")
    server.receiver = state
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def payload_of(alert: BudgetAlertRow) -> dict[str, Any]:
    """The contract's webhook JSON for an alert row."""
    payload: dict[str, Any] = {
        "type": "budget.threshold_crossed"
        if alert.kind == "threshold"
        else "budget.forecast_exceeded",
        "budget_id": alert.budget_id,
        "tenant_id": alert.tenant_id,
        "project_id": alert.project_id,
        "threshold": float(alert.threshold) if alert.threshold else None,
        "spend_usd": format(alert.spend_usd, "f"),
        "amount_usd": format(alert.amount_usd, "f"),
        "period": alert.period,
        "at": alert.at.isoformat().replace("+00:00", "Z"),
    }
    if alert.forecast_usd is not None:
        payload["forecast_usd"] = format(alert.forecast_usd, "f")
    return payload


def fire(
    sessions: sessionmaker[Session],
    channels: list[dict[str, Any]],
    *,
    thresholds: tuple[str, ...] = ("0.8",),
    project_id: str | None = "search",
    at: datetime | None = None,
) -> list[tuple[BudgetAlertRow, list[AlertDeliveryRow]]]:
    """A budget and one alert per threshold, each enqueued on `channels`, in one commit."""
    at = at or datetime.now(UTC) - timedelta(seconds=1)
    budget_id = "bud_" + uuid.uuid4().hex[:12]
    fired: list[tuple[BudgetAlertRow, list[AlertDeliveryRow]]] = []
    with sessions.begin() as session:
        session.add(
            BudgetRow(
                id=budget_id,
                tenant_id="acme",
                project_id=project_id,
                amount_usd=Decimal("100"),
                thresholds=list(thresholds),
                hard_limit=False,
                channels=channels,
            )
        )
        session.flush()
        for threshold in thresholds:
            alert = BudgetAlertRow(
                id="alr_" + uuid.uuid4().hex[:12],
                budget_id=budget_id,
                tenant_id="acme",
                project_id=project_id,
                period="2026-11",
                kind="threshold",
                threshold=threshold,
                arm=0,
                spend_usd=Decimal(threshold) * 100 + Decimal("0.5"),
                amount_usd=Decimal("100"),
                at=at,
            )
            session.add(alert)
            fired.append((alert, outbox.enqueue(session, alert, channels, payload_of(alert))))
    return fired


def rows(sessions: sessionmaker[Session]) -> dict[str, AlertDeliveryRow]:
    with sessions() as session:
        return {row.id: row for row in session.query(AlertDeliveryRow).all()}


class Clock:
    """A controllable clock for a Deliverer: starts at the wall clock, moves on `advance`."""

    def __init__(self) -> None:
        self.t = datetime.now(UTC)
        self.lock = threading.Lock()

    def __call__(self) -> datetime:
        with self.lock:
            return self.t

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.t += timedelta(seconds=seconds)
