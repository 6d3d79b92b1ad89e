"""The scheduler's monthly invoicing job (every 10 minutes, UTC).

For each of the last two months that have ended: when the month has ended and has no run
yet, build its drafts; once `METERING_INVOICE_GRACE_DAYS` have passed since its end,
finalize it (again while drafts are held, e.g. for unpriced usage, so that they are
finalized once a price covers them). Each run is one transaction under the invoice-run
lock, so the job, the API and the CLI can run at once without harm. Then, with
`METERING_STRIPE_API_KEY` set, finalized invoices not yet in Stripe are sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from billing.invoices import repository as repo
from billing.invoices.periods import Period
from billing.invoices.stripe_sync import StripeGateway, sync_pending
from billing.prices.book import PriceBookCache
from metering.analytics.deps import ReadPool
from metering.db.engine import session_scope
from metering.invoices import service
from metering.settings import Settings

log = logging.getLogger(__name__)


class InvoiceJobState(Protocol):
    settings: Settings
    sessions: sessionmaker[Session]

    @property
    def reads(self) -> ReadPool: ...

    @property
    def prices(self) -> PriceBookCache: ...


def due_runs(
    sessions: sessionmaker[Session], now: datetime, grace_days: int
) -> list[tuple[Period, bool]]:
    """(month, finalize) for each run the job owes at `now`."""
    runs = []
    current = Period.of(now)
    with sessions() as session:
        for period in (current.minus(2), current.minus(1)):
            row = repo.get_period(session, str(period))
            due = now >= period.end + timedelta(days=grace_days)
            if due:
                closed = row is not None and row.status == "finalized"
                if not closed or repo.draft_tenants(session, str(period)):
                    runs.append((period, True))
            elif row is None:
                runs.append((period, False))
    return runs


def run_invoices(
    state: InvoiceJobState, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> list[dict[str, Any]]:
    at = now()
    done = []
    for period, finalize in due_runs(state.sessions, at, state.settings.invoice_grace_days):
        book = state.prices.get()
        with session_scope(state.sessions) as session, state.reads.client() as ch:
            result = service.run_period(
                session,
                ch,
                book,
                period,
                finalize=finalize,
                now=at,
                stripe=bool(state.settings.stripe_api_key),
            )
        log.info("invoices %s: %s", period, result.out())
        done.append(result.out())
    if state.settings.stripe_api_key:
        sent = sync_pending(state.sessions, StripeGateway(state.settings.stripe_api_key))
        log.info("stripe sync: %s", sent)
    return done
