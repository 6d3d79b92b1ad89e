"""The worker that sends due alert deliveries (see `billing.alerts.outbox` for the design)."""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from billing.alerts import messages, senders
from billing.alerts.store import deliveries_for, log_target
from billing.budgets.models import AlertDeliveryRow

logger = logging.getLogger(__name__)
D = AlertDeliveryRow
Outcome = str  # "delivered" | "retry" | "failed"


@dataclass(frozen=True)
class _Claim:
    id: str
    channel: dict[str, Any]
    body: str
    attempts: int  # before this attempt
    lease: datetime


class Deliverer:
    """Sends due deliveries: `run_due` for one pass, or a thread (`start`/`wake`/`stop`)."""

    deliveries_for = staticmethod(deliveries_for)

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        smtp_url: str | None,
        smtp_from: str | None,
        allow_private: bool,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        max_attempts: int = 20,
        lease_seconds: float = 60.0,
        timeout: float = 10.0,
        on_result: Callable[[str, str], None] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if lease_seconds <= timeout:
            raise ValueError("lease_seconds must exceed the send timeout")
        self.sessions = sessions
        self.smtp_url = smtp_url
        self.smtp_from = smtp_from
        self.allow_private = allow_private
        self.now = now
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.timeout = timeout
        self.on_result = on_result
        self._random = random.Random()
        self._woken = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass ------------------------------------------------------------------

    def run_due(self, limit: int = 100) -> int:
        """Claim, send and record every due row (at most `limit`); return how many."""
        return self._run(limit, None)

    def _run(self, limit: int, stopping: threading.Event | None) -> int:
        now = self.now()
        with self.sessions() as session:
            due = session.execute(
                select(D.id, D.status, D.lease_until, D.attempts)
                .where(
                    or_(
                        and_(D.status == "pending", D.next_attempt_at <= now),
                        and_(D.status == "sending", D.lease_until <= now),
                    )
                )
                .order_by(D.next_attempt_at, D.id)
                .limit(limit)
            ).all()
        attempted = 0
        for row_id, status, lease_until, attempts in due:
            if stopping is not None and stopping.is_set():
                break
            claim = self._claim(row_id, status, lease_until, attempts)
            if claim is None:
                continue  # another worker took it
            attempted += 1
            self._attempt(claim)
        return attempted

    def _claim(
        self, row_id: str, status: str, lease_until: datetime | None, attempts: int
    ) -> _Claim | None:
        lease = self.now() + timedelta(seconds=self.lease_seconds)
        same_lease = (
            D.lease_until.is_(None) if lease_until is None else D.lease_until == lease_until
        )
        with self.sessions.begin() as session:
            result = cast(
                CursorResult[Any],
                session.execute(
                    update(D)
                    .where(D.id == row_id, D.status == status, D.attempts == attempts, same_lease)
                    .values(status="sending", lease_until=lease)
                    .execution_options(synchronize_session=False)
                ),
            )
            if result.rowcount != 1:
                return None
            row = session.execute(select(D.channel, D.body).where(D.id == row_id)).one()
        return _Claim(row_id, dict(row.channel), row.body, attempts, lease)

    def _send(self, claim: _Claim) -> None:
        channel = claim.channel
        kind = channel.get("type")
        if kind in ("webhook", "slack"):
            body = claim.body.encode("utf-8")
            headers = {"Content-Type": "application/json"}
            if kind == "webhook":
                event = json.loads(claim.body).get("type", "")
                headers |= {
                    "X-Metering-Signature": messages.sign(str(channel.get("secret", "")), body),
                    "X-Metering-Delivery": claim.id,
                    "X-Metering-Event": str(event),
                }
            senders.post(
                str(channel.get("url")),
                body,
                headers,
                allow_private=self.allow_private,
                timeout=self.timeout,
            )
        elif kind == "email":
            content = json.loads(claim.body)
            senders.send_email(
                smtp_url=self.smtp_url,
                smtp_from=self.smtp_from,
                to=str(channel.get("to")),
                subject=str(content["subject"]),
                text=str(content["text"]),
                delivery_id=claim.id,
                timeout=self.timeout,
            )
        else:
            raise senders.PermanentError(f"channel: unknown type {kind!r}")

    def backoff(self, attempts: int) -> float:
        """Full jitter: uniform in [0, min(max_delay, base_delay * 2**attempts)]."""
        cap = min(self.max_delay, self.base_delay * 2.0 ** min(attempts, 64))
        return self._random.uniform(0.0, cap)

    def _attempt(self, claim: _Claim) -> None:
        error: str | None = None
        permanent = False
        try:
            self._send(claim)
        except senders.PermanentError as exc:
            error, permanent = str(exc), True
        except senders.RetryableError as exc:
            error = str(exc)
        except Exception as exc:  # a bug must not leave the row leased until expiry
            logger.exception("alert delivery %s: unexpected error", claim.id)
            error = f"{type(exc).__name__}: {exc}"[: senders.MAX_ERROR_LENGTH]
        now = self.now()
        attempts = claim.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "lease_until": None, "last_error": error}
        if error is None:
            outcome: Outcome = "delivered"
            values |= {"status": "delivered", "delivered_at": now}
        elif permanent or attempts >= self.max_attempts:
            outcome = "failed"
            values |= {"status": "failed"}
        else:
            outcome = "retry"
            next_at = now + timedelta(seconds=self.backoff(claim.attempts))
            values |= {"status": "pending", "next_attempt_at": next_at}
        with self.sessions.begin() as session:
            result = cast(
                CursorResult[Any],
                session.execute(
                    update(D)
                    .where(D.id == claim.id, D.status == "sending", D.lease_until == claim.lease)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                ),
            )
        where = f"{claim.channel.get('type')} {log_target(claim.channel)}"
        if result.rowcount != 1:
            logger.warning(
                "alert delivery %s to %s: lease lost before the outcome (%s) was recorded",
                claim.id,
                where,
                outcome,
            )
        elif outcome == "delivered":
            logger.info(
                "alert delivery %s to %s: delivered (attempt %d)", claim.id, where, attempts
            )
        elif outcome == "retry":
            logger.warning(
                "alert delivery %s to %s: attempt %d failed (%s), retry at %s",
                claim.id,
                where,
                attempts,
                error,
                messages.rfc3339(values["next_attempt_at"]),
            )
        else:
            logger.error(
                "alert delivery %s to %s: failed after %d attempts (%s)",
                claim.id,
                where,
                attempts,
                error,
            )
        if self.on_result is not None:
            try:
                self.on_result(str(claim.channel.get("type")), outcome)
            except Exception:
                logger.exception("alert delivery %s: on_result callback failed", claim.id)

    # -- the worker thread ---------------------------------------------------------

    def start(self) -> None:
        """Run passes in a daemon thread: when woken, and every second."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="alert-deliverer", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run a pass now (call after committing a new alert)."""
        self._woken.set()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the send in progress; True if the thread ended within `timeout`."""
        self._stopping.set()
        self._woken.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _loop(self) -> None:
        limit = 100
        while not self._stopping.is_set():
            try:
                while not self._stopping.is_set() and self._run(limit, self._stopping) >= limit:
                    pass
            except Exception:
                logger.exception("alert deliveries: pass failed; next pass in 1 s")
            self._woken.wait(1.0)
            self._woken.clear()
