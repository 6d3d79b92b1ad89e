"""Closing a seed-scale month on PostgreSQL, next to the raw ClickHouse aggregation of the
same month, in one run.

    .venv/bin/python -m bench.invoices --data-dir /tmp/inv-seed \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench_invoices \\
        --period 2026-10 --results bench/RESULTS.md

The data dir must hold a whole month of events with its tenants registered in that
database, e.g. (24.5M events, 210K tenants, the seed page's figures, all in October 2026):

    METERING_DATA_DIR=/tmp/inv-seed METERING_DATABASE_URL=postgresql+psycopg://... \\
        metering simulate backfill --days 31 --end 2026-11-01T00:00:00Z \\
        --events 24500000 --tenants 210000

(`bench.analytics --fill-only` fills the 30 days ending now, which is no closed month.)

1. Baseline: the raw aggregation of the month alone, as the close issues it (billable events
   per tenant, project, provider, model and price span, sorted, every row read into a
   Python list: `usage.billable_rows`), with chDB on this data dir. Timed before and
   after the close; the better one is the baseline.
2. Close: the invoice tables are emptied, then `run_period(..., finalize=True)` builds,
   numbers and stores every invoice and line in one PostgreSQL transaction, committed;
   timed to the commit, with a breakdown (late usage; the streamed part: ClickHouse
   read, building and the lines' COPY, overlapped; the invoices' rows; the commit) and
   this process's CPU time (Python and chDB; PostgreSQL works in its own process).
3. Checked: one invoice per tenant with billable usage, numbers 1..N without gaps, lines
   and totals in the database as built; the run again (a closed month) changes nothing.
4. Figures appended to `--results` with the command, the machine and the commit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select, text

from billing.invoices.models import InvoiceLineRow, InvoiceRow
from billing.invoices.periods import Period
from billing.prices.book import list_prices
from billing.rating import PriceBook
from metering.clickhouse import migrations as ch_migrations
from metering.clickhouse.client import make_client
from metering.db import migrations as relational_migrations
from metering.db.engine import make_engine, make_session_factory
from metering.invoices import service
from metering.invoices import usage as ch_usage

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 60.0
T = TypeVar("T")


class Timer:
    """Wall time spent inside wrapped functions, by name."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., T]) -> Callable[..., T]:
        def timed(*args: Any, **kwargs: Any) -> T:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - started

        return timed


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def baseline(ch: Any, book: PriceBook, period: Period) -> tuple[float, int]:
    started = time.perf_counter()
    rows = list(ch_usage.billable_rows(ch, book, period.start, period.end))
    return time.perf_counter() - started, len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--period", default="2026-10")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--note", default="")
    parser.add_argument(
        "--drafts-first",
        action="store_true",
        help="build the month's drafts first (the scheduler's way: drafts when the month"
        " ends, finalized after the grace days); the close then rebuilds and finalizes them",
    )
    args = parser.parse_args(argv)
    period = Period.parse(args.period)
    load_before = os.getloadavg()
    engine = make_engine(args.database_url)
    ch = make_client(f"chdb://{(args.data_dir / 'clickhouse').resolve()}", "default")
    relational_migrations.upgrade(engine)
    ch_migrations.migrate(ch)
    sessions = make_session_factory(engine)
    with sessions() as session:
        book = PriceBook(list_prices(session))
    events, tenants = ch.query(
        "SELECT count(), uniqExact(tenant_id) FROM rerank_events"
        " WHERE timestamp >= {a:DateTime64(3, 'UTC')} AND timestamp < {b:DateTime64(3, 'UTC')}",
        parameters={"a": period.start, "b": period.end},
    ).result_rows[0]
    billable = ch.query(
        "SELECT uniqExact(tenant_id) FROM rerank_events WHERE timestamp >= {a:DateTime64(3, 'UTC')}"
        " AND timestamp < {b:DateTime64(3, 'UTC')} AND status = 'ok'"
        " AND (input_tokens > 0 OR output_tokens > 0 OR documents > 0)",
        parameters={"a": period.start, "b": period.end},
    ).result_rows[0][0]
    print(f"{period}: {events:,} events, {tenants:,} tenants ({billable:,} with billable usage)")

    base1, rows = baseline(ch, book, period)
    print(f"baseline (raw aggregation into Python): {base1:.1f} s, {rows:,} rows")

    with engine.begin() as conn:
        conn.execute(text("DELETE FROM invoice_lines"))
        conn.execute(text("DELETE FROM invoices"))
        conn.execute(text("DELETE FROM invoice_periods"))
        conn.execute(text("UPDATE invoice_counters SET last_number = 0"))
    timer = Timer()
    real = (service.late_usage, service._draft_all, service._store_invoices)
    now = datetime.now(UTC)
    drafting = None
    if args.drafts_first:
        started = time.perf_counter()
        with sessions() as session:
            drafted = service.run_period(session, ch, book, period, finalize=False, now=now)
            session.commit()
        drafting = time.perf_counter() - started
        print(f"drafts first: {drafting:.1f} s -> created {drafted.created:,}")
    service.late_usage = timer.wrap("late usage", real[0])
    service._draft_all = timer.wrap("read + build + lines COPY (streamed)", real[1])
    service._store_invoices = timer.wrap("invoices", real[2])
    started = time.perf_counter()
    cpu_started = time.process_time()
    with sessions() as session:
        result = service.run_period(session, ch, book, period, finalize=True, now=now)
        commit_started = time.perf_counter()
        session.commit()
    close = time.perf_counter() - started
    close_cpu = time.process_time() - cpu_started
    timer.spent["commit"] = time.perf_counter() - commit_started
    service.late_usage, service._draft_all, service._store_invoices = real
    print(f"close: {close:.1f} s (this process's CPU {close_cpu:.1f} s) {timer.spent}")
    print(f"  -> {result.out() | {'held': len(result.held)}}")

    with sessions() as session:
        n, low, high = session.execute(
            select(func.count(), func.min(InvoiceRow.number), func.max(InvoiceRow.number)).where(
                InvoiceRow.period == str(period)
            )
        ).one()
        n_lines = session.scalar(select(func.count()).select_from(InvoiceLineRow))
    checks = {
        "one invoice per billable tenant": n == billable == result.finalized,
        "numbers 1..N without gaps": (low, high) == (1, n),
    }
    started = time.perf_counter()
    with sessions() as session:
        again = service.run_period(session, ch, book, period, finalize=True, now=now)
        session.commit()
    rerun = time.perf_counter() - started
    checks["a second run changes nothing"] = (again.created, again.refreshed, again.finalized) == (
        0,
        0,
        0,
    )
    base2, _ = baseline(ch, book, period)
    base = min(base1, base2)
    ratio = close / base
    ok = all(checks.values())
    print(f"baseline again: {base2:.1f} s; close / baseline = {ratio:.2f}; checks {checks}")
    met = "met" if close <= TARGET_SECONDS else "MISSED"
    print(f"target close <= {TARGET_SECONDS:.0f} s: {met} ({close:.1f} s)")

    if args.results is not None:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "metering", "billing", "migrations")
        load_after = os.getloadavg()
        argv_text = " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        spent = ", ".join(f"{k} {v:.1f} s" for k, v in timer.spent.items())
        note = f", {args.note}" if args.note else ""
        code = head + (" + working tree" if dirty else "")
        br = "  \n"  # a Markdown line break
        entry = "\n".join(
            [
                "",
                f"### bench/invoices.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC{note}",
                "",
                f"Command: `python -m bench.invoices {argv_text}`{br}"
                f"Machine: {os.cpu_count()} cores, load {load_before[0]:.2f} before /"
                f" {load_after[0]:.2f} after; code {code}; PostgreSQL on loopback,"
                f" chDB on the data dir{br}"
                f"Month {period}: {events:,} events, {tenants:,} tenants ({billable:,} with"
                f" billable usage); {rows:,} usage rows (tenant, project, provider, model,"
                " price span)",
                "",
                "| step | seconds | ratio to baseline |",
                "|---|---|---|",
                "| baseline: raw ClickHouse aggregation of the month into Python (best of 2)"
                f" | {base:.1f} | 1.00 |",
                *(
                    [f"| drafts first (finalize false) | {drafting:.1f} | {drafting / base:.2f} |"]
                    if drafting is not None
                    else []
                ),
                "| close (draft + finalize + numbers, one transaction, committed)"
                + (", rebuilding the drafts" if drafting is not None else "")
                + f" | {close:.1f} | {ratio:.2f} |",
                f"| run again (closed month: nothing to do) | {rerun:.2f} | {rerun / base:.2f} |",
                "",
                f"Close breakdown: {spent}; CPU time of this process (Python and chDB)"
                f" {close_cpu:.1f} s. Invoices {n:,}, lines {n_lines:,}, total"
                f" {result.out()['total_usd']} USD.{br}"
                "Checks: "
                + "; ".join(f"{k}: {'OK' if v else 'FAILED'}" for k, v in checks.items())
                + br
                + f"Target close <= {TARGET_SECONDS:.0f} s on PostgreSQL: {met} ({close:.1f} s)",
                "",
            ]
        )
        with args.results.open("a") as f:
            f.write(entry)
    ch.close()
    engine.dispose()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
