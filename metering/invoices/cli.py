"""`metering invoices run --period YYYY-MM [--finalize]` and `metering invoices verify
--period YYYY-MM`: the same work as `POST /v1/invoices/run` and the audit, from a shell.

Both apply pending migrations first (as `jobs run` does). `run` is one transaction under
the invoice-run lock, so it may run while the API or the scheduler runs the same month.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from billing.invoices.periods import BadPeriod, Period
from billing.invoices.stripe_sync import StripeGateway, sync_pending
from billing.prices.book import list_prices
from billing.rating import PriceBook
from metering.clickhouse import migrations as ch_migrations
from metering.clickhouse.client import make_client
from metering.db import migrations as relational_migrations
from metering.db.engine import make_engine, make_session_factory, session_scope
from metering.invoices import service
from metering.invoices.verify import verify_period
from metering.settings import Settings


def invoices_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        period = Period.parse(args.period)
    except BadPeriod as exc:
        print(f"metering invoices: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(settings.resolved_database_url)
    ch = make_client(settings.resolved_clickhouse_url, settings.clickhouse_database)
    try:
        relational_migrations.upgrade(engine)
        ch_migrations.migrate(ch)
        sessions = make_session_factory(engine)
        with sessions() as session:
            book = PriceBook(list_prices(session))
        if args.invoices_command == "run":
            try:
                with session_scope(sessions) as session:
                    result = service.run_period(
                        session,
                        ch,
                        book,
                        period,
                        finalize=args.finalize,
                        now=datetime.now(UTC),
                        stripe=bool(settings.stripe_api_key),
                    )
            except service.PeriodNotEnded as exc:
                print(f"metering invoices: {exc}", file=sys.stderr)
                return 2
            print(json.dumps(result.out()))
            if args.finalize and settings.stripe_api_key:
                sent = sync_pending(sessions, StripeGateway(settings.stripe_api_key))
                print(f"stripe: {sent['sent']} sent, {sent['failed']} failed", file=sys.stderr)
            return 0
        with sessions() as session:
            diffs = verify_period(session, ch, book, period)
        for line in diffs:
            print(line)
        print(f"verify {period}: {len(diffs)} difference(s)", file=sys.stderr)
        return 1 if diffs else 0
    finally:
        ch.close()
        engine.dispose()
