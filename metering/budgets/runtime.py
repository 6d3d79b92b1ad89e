"""Budgets at run time: the spend ledger, its exact resyncs, the alert worker.

- The ledger (`billing.budgets.ledger`) is the events pipeline's admission hook: every
  admitted batch's usage is counted when its spool write completes, before its 202.
  `POST /v1/authorize` reads it and nothing else.
- `resync` makes the ledger exact against ClickHouse at a cut of the pipeline (see the
  ledger's docstring): at start (after the spool replay, so the replayed events are in
  ClickHouse), when a budget's scope is new, when the price book changes, and each
  minute (`reconcile`, which also reports the drift it corrected in /metrics).
- The worker thread wakes when spend changes and fires thresholds that spend crossed;
  each minute `reconcile` also fires forecast alerts. Firing is decided by the database
  (unique alert rows), so a restart, `kill -9` or a second worker never fires twice; an
  in-memory set of what fired only saves queries. Deliveries go through the outbox
  (`billing.alerts.outbox.Deliverer`), which retries until delivered.
"""

from __future__ import annotations

import decimal
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client
from sqlalchemy.orm import Session, sessionmaker

from billing.alerts.outbox import Deliverer
from billing.budgets import service
from billing.budgets.forecast import (
    HISTORY_DAYS,
    Profile,
    build_profile,
    next_month_start,
    period_of,
)
from billing.budgets.ledger import Limit, Scope, SpendLedger, UsageMap, pause
from billing.prices.book import PriceBookCache
from billing.rating import EXACT, money
from metering import metrics
from metering.budgets.spend import clickhouse_now, hourly_spend, scope_usage
from metering.ingest.spool import Unavailable
from metering.ingest.structs import Event

log = logging.getLogger(__name__)

MICRO = Decimal("0.000001")
ROUNDING = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)
RESYNC_TIMEOUT = 30.0  # seconds to wait for the writer to reach the cut
CLOCK_STEP = 0.003  # seconds: more than one tick of DateTime64(3)
PROFILE_TTL = timedelta(hours=1)
TICK = 0.1  # seconds: the shortest gap between the alert worker's checks
WORK_SHARE = 0.1  # ... unless its last check took longer than this share of the gap
MAX_GAP = 1.0  # seconds: the longest gap between two checks when spend changes
BOOK_POLL = 2.0  # seconds between price book checks (another replica's new entry)


class Cut:
    """The events pipeline as the ledger's resync needs it (hold, wait, release)."""

    def __init__(
        self,
        hold: Callable[[], int],
        wait: Callable[[int, float], bool],
        release: Callable[[], None],
        stored: Callable[[float], bool],
    ) -> None:
        self.hold, self.wait, self.release = hold, wait, release
        self.stored = stored  # waits until everything admitted so far is in ClickHouse


class BudgetRuntime:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        smtp_url: str | None,
        smtp_from: str | None,
        allow_private: bool,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.sessions = sessions
        self.now = now
        self.allow_private = allow_private
        self.ledger = SpendLedger(now)
        self.ledger.on_change = self._wake_worker
        self.deliverer = Deliverer(
            sessions=sessions,
            smtp_url=smtp_url,
            smtp_from=smtp_from,
            allow_private=allow_private,
            now=now,
            on_result=_count_delivery,
        )
        self.prices: PriceBookCache | None = None
        self.cut: Cut | None = None
        self._ch: Client | None = None
        self._resync_lock = threading.Lock()
        self._fired: set[tuple[str, str, str]] = set()
        self._fired_period = ""
        self._profiles: dict[Scope, tuple[datetime, Profile]] = {}
        # Per scope: (hour, profile, expected spend from the next hour to the month's end).
        self._rest: dict[Scope, tuple[datetime, Profile, Decimal]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._book_checked = 0.0
        self._versions: dict[str, datetime] = {}  # budget id -> updated_at as last loaded
        self.started = False

    # -- admission hook (the events pipeline calls these) ----------------------------------

    def prepare(self, items: Sequence[Event]) -> UsageMap | None:
        return self.ledger.prepare(items)

    def durable(self, seq: int, prepared: UsageMap) -> None:
        self.ledger.durable(seq, prepared)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, ch: Client, prices: PriceBookCache, cut: Cut) -> None:
        """Load the budgets, build the ledger exactly, start the worker and the outbox.
        Called once the events pipeline has replayed its spool; raises (and may be
        called again) while a store is unreachable."""
        self._ch, self.prices, self.cut = ch, prices, cut
        self._versions = {}
        self._reload_limits()
        self.ledger.set_book(prices.get())
        self.resync()
        self._load_fired()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="budgets", daemon=True)
            self._thread.start()
            self.deliverer.start()
        self.started = True
        self._wake_worker()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.deliverer.stop(5.0)
        self.started = False

    def _wake_worker(self) -> None:
        self._wake.set()

    # -- exactness --------------------------------------------------------------------------

    def resync(self, scopes: set[Scope] | None = None) -> dict[Scope, Decimal]:
        """Make the ledger exact for `scopes` (None: all) at a cut of the pipeline."""
        if self._ch is None or self.cut is None:
            raise Unavailable("budgets: not started yet")
        with self._resync_lock:
            started = time.perf_counter()
            seq = self.cut.hold()
            try:
                chosen = self.ledger.begin_resync(seq, scopes)
                if not self.cut.wait(seq, RESYNC_TIMEOUT):
                    raise Unavailable("budgets: ClickHouse is not storing events; retry")
                # Every record up to the cut is stored and none after: ClickHouse's clock
                # now separates them (`ingested_at`), so the writer may go on while the
                # base is read. The pause makes the next insert's millisecond a later one.
                stored_until = clickhouse_now(self._ch)
                time.sleep(CLOCK_STEP)
            except BaseException:
                self.ledger.abort_resync()
                raise
            finally:
                self.cut.release()
            metrics.BUDGET_HOLD_SECONDS.observe(time.perf_counter() - started)
            try:
                base = scope_usage(
                    self._ch, self.ledger.book, chosen, self.ledger.periods_from(), stored_until
                )
            except BaseException:
                self.ledger.abort_resync()
                raise
            drift = self.ledger.finish_resync(base)
            metrics.BUDGET_RESYNC_SECONDS.observe(time.perf_counter() - started)
            return drift

    def reconcile(self) -> dict[str, Any]:
        """The minute's job: pick up budgets edited elsewhere, resync everything, report
        the drift, fire forecast alerts."""
        self._reload_limits()
        if self.prices is not None:
            self.ledger.set_book(self.prices.get())
        drift = self.resync()
        total = EXACT.add(Decimal(0), sum((abs(d) for d in drift.values()), Decimal(0)))
        drifted = sum(1 for d in drift.values() if d)
        metrics.BUDGET_DRIFT_USD.set(float(total))
        metrics.BUDGET_DRIFTED_SCOPES.set(drifted)
        if drifted:
            log.warning("budget spend drifted for %d scopes (%s USD); corrected", drifted, total)
        forecasts = self._fire_forecasts()
        return {"scopes": len(drift), "drifted": drifted, "drift_usd": money(total), **forecasts}

    def _reload_limits(self) -> None:
        """The live budgets into the ledger: every row read only when most changed (at
        start); else their versions, and whole rows of the new or edited ones (another
        replica's edits reach this one's ledger here)."""
        current = {limit.id: limit for limit in self.ledger.limits()}
        with self.sessions() as session:
            versions = service.live_versions(session)
            changed = [
                budget_id
                for budget_id, updated in versions.items()
                if budget_id not in current or self._versions.get(budget_id) != updated
            ]
            if len(changed) > len(versions) // 2:
                rows = service.live(session)
            else:
                rows = service.live_by_ids(session, changed)
        fresh = set(changed)
        limits = {i: current[i] for i in versions if i in current and i not in fresh}
        loaded = {i: self._versions[i] for i in limits}
        for n, row in enumerate(rows):
            limits[row.id] = service.to_limit(row)
            loaded[row.id] = row.updated_at
            pause(n)
        self._versions = loaded
        # In the rows' order (created_at, id): authorize lists a tenant's budgets so.
        self.ledger.set_limits(limits[i] for i in versions if i in limits)

    # -- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        last = 0.0
        gap = TICK
        while not self._stop.is_set():
            self._wake.wait(1.0)
            # Coalesce: under ingest every batch wakes the worker; checking at most every
            # `gap` seconds rates each changed scope once per tick, not once per batch.
            # The gap is TICK, or WORK_SHARE's inverse times the last tick's CPU when that
            # is longer (at most MAX_GAP): with thousands of budgets changing under
            # ingest, the checks keep to a tenth of a core and of the GIL.
            early = gap - (time.monotonic() - last)
            if early > 0 and self._stop.wait(early):
                return
            self._wake.clear()
            if self._stop.is_set():
                return
            last = time.monotonic()
            began = time.thread_time()
            try:
                self._tick()
            except Exception:
                log.exception("budget worker")
                self._stop.wait(1.0)
            gap = min(MAX_GAP, max(TICK, (time.thread_time() - began) / WORK_SHARE))

    def _tick(self) -> None:
        if period_of(self.now()) != self._fired_period:
            self.ledger.roll()
            self._load_fired()
            self._profiles.clear()
        if self.prices is not None and time.monotonic() - self._book_checked > BOOK_POLL:
            self._book_checked = time.monotonic()
            if self.ledger.set_book(self.prices.get()):
                self.resync()
        changed = self.ledger.take_changed()
        if changed:
            self._fire_thresholds(changed)

    def check_now(self) -> None:
        """Run the worker's checks at once, on the caller's thread (tests, edits)."""
        self._tick()

    def _load_fired(self) -> None:
        period = period_of(self.now())
        with self.sessions() as session:
            self._fired = service.armed_firings(session, period)
        self._fired_period = period

    def _fire_thresholds(self, scopes: set[Scope]) -> None:
        due: list[tuple[Limit, Decimal, tuple[str, str, str], Decimal]] = []
        for n, limit in enumerate(self.ledger.limits_of(scopes)):
            pause(n)
            armed = [
                (threshold, key)
                for threshold in limit.thresholds
                if (key := (limit.id, "threshold", _threshold_text(threshold))) not in self._fired
            ]
            if not armed:
                continue  # every threshold fired this period: no need to rate the spend
            spend, _ = self.ledger.spend(limit.scope)
            for threshold, key in armed:
                if spend >= EXACT.multiply(threshold, limit.amount):
                    due.append((limit, threshold, key, spend))
        if due and self._fire_due(due):
            self.deliverer.wake()

    def _fire_due(self, due: list[tuple[Limit, Decimal, tuple[str, str, str], Decimal]]) -> bool:
        """Fire the crossings of one tick in one transaction (one at a time if another
        process fired one of them meanwhile); True if any fired now."""
        firings = [
            service.Firing(limit.id, "threshold", threshold, spend, None, self.now())
            for limit, threshold, _, spend in due
        ]
        with self.sessions() as session:
            alerts = service.fire_many(session, firings)
        fired_any = False
        if alerts is None:
            for limit, threshold, key, spend in due:
                outcome = self._fire(limit, "threshold", threshold, spend, None)
                if outcome is not None:  # fired now, or had fired before
                    self._fired.add(key)
                    fired_any |= outcome
            return fired_any
        for (limit, _, key, spend), alert in zip(due, alerts, strict=True):
            self._fired.add(key)  # fired now, had fired before, or the budget is gone
            if alert is not None:
                metrics.BUDGET_ALERTS.labels("threshold").inc()
                log.info("budget %s: threshold alert fired (spend %s)", limit.id, spend)
                fired_any = True
        return fired_any

    def _fire(
        self,
        limit: Limit,
        kind: str,
        threshold: Decimal | None,
        spend: Decimal,
        forecast: Decimal | None,
    ) -> bool | None:
        """True: fired now; False: it had fired already; None: the budget is gone."""
        with self.sessions() as session:
            row = service.get(session, limit.id)
            if row is None:
                return None
            alert = service.fire(
                session,
                row,
                kind=kind,
                threshold=threshold,
                spend=spend,
                forecast=forecast,
                at=self.now(),
            )
        if alert is not None:
            metrics.BUDGET_ALERTS.labels(kind).inc()
            log.info("budget %s: %s alert fired (spend %s)", limit.id, kind, spend)
        return alert is not None

    # -- forecasts --------------------------------------------------------------------------

    def _refresh_profiles(self, scopes: set[Scope]) -> None:
        now = self.now()
        stale = {s for s in scopes if s not in self._profiles or self._profiles[s][0] < now}
        if not stale or self._ch is None or self.cut is None:
            return
        self.cut.stored(5.0)  # the history includes every event acknowledged so far
        hour = now.replace(minute=0, second=0, microsecond=0)
        series = hourly_spend(
            self._ch, self.ledger.book, stale, hour - timedelta(days=HISTORY_DAYS), hour
        )
        for n, scope in enumerate(stale):
            self._profiles[scope] = (now + PROFILE_TTL, build_profile(series[scope], now))
            pause(n, 16)

    def forecast(self, limit: Limit) -> Decimal:
        """Month-end spend of the budget's scope: spend so far (the ledger) plus the
        profile's expectation for the rest of the month (billing.budgets.forecast). The
        expectation after the current hour is kept per scope for the hour: the minute's
        check of every budget costs a lookup each, not a walk over the month."""
        self._refresh_profiles({limit.scope})
        spend, _ = self.ledger.spend(limit.scope)
        now = self.now()
        end = next_month_start(now)
        profile = self._profiles[limit.scope][1]
        hour = now.replace(minute=0, second=0, microsecond=0)
        after = hour + timedelta(hours=1)
        cached = self._rest.get(limit.scope)
        if cached is None or cached[0] != hour or cached[1] is not profile:
            cached = (hour, profile, profile.expected(after, end) if after < end else Decimal(0))
            self._rest[limit.scope] = cached
        partial = profile.expected(now, min(after, end))
        return EXACT.add(EXACT.add(spend, partial), cached[2]).quantize(MICRO, context=ROUNDING)

    def _fire_forecasts(self) -> dict[str, int]:
        limits = self.ledger.limits()
        self._refresh_profiles({limit.scope for limit in limits})
        fired = 0
        for n, limit in enumerate(limits):
            pause(n)
            key = (limit.id, "forecast", "")
            if key in self._fired:
                continue
            projected = self.forecast(limit)
            if projected > limit.amount:
                spend, _ = self.ledger.spend(limit.scope)
                outcome = self._fire(limit, "forecast", None, spend, projected)
                if outcome is not None:
                    self._fired.add(key)
                    fired += int(outcome)
        if fired:
            self.deliverer.wake()
        return {"forecast_alerts": fired}

    # -- edits (the routes call these after committing) ---------------------------------

    def budget_saved(self, limit: Limit) -> None:
        """Before the route commits a new or edited budget: track its scope (an exact
        resync if the scope is new; raises Unavailable if ClickHouse cannot answer)."""
        if self.ledger.put_limit(limit):
            try:
                self.resync({limit.scope})
            except BaseException:
                self.ledger.drop_limit(limit.id)
                raise

    def budget_committed(self, limit: Limit) -> None:
        """After the commit: re-read what fired (an edit may have re-armed thresholds)
        and fire what the spend crosses now."""
        for key in [k for k in self._fired if k[0] == limit.id]:
            self._fired.discard(key)
        self._reload_fired_of(limit.id)
        self._fire_thresholds({limit.scope})

    def _reload_fired_of(self, budget_id: str) -> None:
        with self.sessions() as session:
            mine = {
                k for k in service.armed_firings(session, self._fired_period) if k[0] == budget_id
            }
        self._fired |= mine

    def budget_ended(self, budget_id: str) -> None:
        self.ledger.drop_limit(budget_id)


_TEXTS: dict[Decimal, str] = {}


def _threshold_text(threshold: Decimal) -> str:
    """`service.threshold_text`, remembered (the worker asks for each threshold of each
    changed budget every tick)."""
    text = _TEXTS.get(threshold)
    if text is None:
        text = _TEXTS[threshold] = service.threshold_text(threshold)
    return text


def _count_delivery(channel: str, outcome: str) -> None:
    metrics.ALERT_DELIVERIES.labels(channel, outcome).inc()
