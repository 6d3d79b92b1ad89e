"""The `metering` console script.

    metering serve [--host 127.0.0.1] [--port 8000] [--demo]
    metering migrate [--dry-run]
    metering simulate backfill|live ...
    metering jobs list | metering jobs run NAME
    metering dashboards push --url URL --token TOKEN | metering dashboards export DIR

Settings come from METERING_* variables (and an optional .env), read once here.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from metering.datadir import ensure_admin_token, lock_or_explain

if TYPE_CHECKING:
    from pydantic import ValidationError

    from metering.app import StartupHook
    from metering.services import Services
    from metering.settings import Settings

# What the server imports that a client-only install (`pip install rerank-metering`) lacks.
_SERVER_PACKAGES = (
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "clickhouse_connect",
    "chdb",
    "pydantic_settings",
    "prometheus_client",
    "apscheduler",
    "numpy",
)
SERVER_EXTRA_HINT = (
    "metering: the server needs the [server] extra: pip install 'rerank-metering[server]'"
)


def _missing_server_package() -> str | None:
    for name in _SERVER_PACKAGES:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metering", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API, dashboard and scheduler")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--demo",
        action="store_true",
        help="fill an empty data dir with 30 days of simulated traffic first",
    )

    migrate = commands.add_parser("migrate", help="apply pending migrations (both stores)")
    migrate.add_argument(
        "--dry-run", action="store_true", help="print the pending migrations' SQL, apply nothing"
    )

    simulate = commands.add_parser("simulate", help="simulated gateway traffic (live or backfill)")
    _add_simulate_arguments(simulate)

    invoices = commands.add_parser("invoices", help="run a month's invoices, or audit them")
    invoices_commands = invoices.add_subparsers(dest="invoices_command", required=True)
    inv_run = invoices_commands.add_parser("run", help="build (or finalize) a month's invoices")
    inv_run.add_argument("--period", required=True, help="YYYY-MM, a month that has ended")
    inv_run.add_argument("--finalize", action="store_true", help="finalize the drafts")
    inv_verify = invoices_commands.add_parser(
        "verify", help="recompute a month's invoices from the raw events; exit 1 on a difference"
    )
    inv_verify.add_argument("--period", required=True, help="YYYY-MM")

    jobs = commands.add_parser("jobs", help="list the scheduler's jobs or run one once")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_commands.add_parser("list")
    run = jobs_commands.add_parser("run")
    run.add_argument("name")

    from metering.dashboards.cli import add_parser as add_dashboards_parser

    add_dashboards_parser(commands)
    return parser


def _setting_problems(exc: ValidationError) -> list[str]:
    """One `METERING_<NAME>: <rule> (got <value>)` per problem pydantic found."""
    problems = []
    for error in exc.errors():
        name = "METERING_" + "_".join(str(part) for part in error["loc"]).upper()
        rule = error["msg"].removeprefix("Value error, ")
        problems.append(f"{name}: {rule} (got {error.get('input')!r})")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    if _missing_server_package() is not None:
        print(SERVER_EXTRA_HINT, file=sys.stderr)
        return 1
    from pydantic import ValidationError

    from metering.settings import Settings

    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("alembic", "apscheduler", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = Settings()
    except ValidationError as exc:
        for problem in _setting_problems(exc):
            print(f"metering: invalid settings: {problem}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. an unreadable .env: pydantic-settings' own errors
        print(f"metering: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.command == "simulate":
        return _simulate(args, settings)
    if args.command == "dashboards":  # Grafana only: no store, no data-dir lock
        from metering.dashboards.cli import dashboards_command

        return dashboards_command(args)
    if args.command == "invoices" and not settings.uses_chdb:
        return _invoices(args, settings)  # no embedded store: no data-dir lock needed
    lock = lock_or_explain(settings.data_dir)
    if lock is None:
        return 1
    try:
        if args.command == "serve":
            return _serve(args, settings)
        if args.command == "migrate":
            return _migrate(args, settings)
        if args.command == "jobs":
            return _jobs(args, settings)
        if args.command == "invoices":
            return _invoices(args, settings)
    finally:
        lock.release()
    return 2


def _admin_token(settings: Settings) -> str:
    token, created = ensure_admin_token(settings.data_dir, settings.admin_token)
    if created:
        print(
            f"metering: generated admin token (stored in {settings.data_dir / 'admin_token'}):"
            f"\n    {token}",
            flush=True,
        )
    return token


def _tune_gc(_: object) -> None:
    """Once started: move the long-lived objects out of the collector's way and collect
    less often. The ingest path allocates few tracked objects (its structs are untracked),
    so fewer, larger collections cost less than the default's frequent ones."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _authorize_replica(settings: Settings, admin_token: str, host: str) -> StartupHook:
    """A startup hook starting the authorize replica (METERING_AUTHORIZE_PORT), fed by the
    services' spend ledger; it is stopped when this process exits."""
    import atexit

    from metering.budgets.replica import AuthorizeFeed

    def start(services: Services) -> None:
        feed = AuthorizeFeed(
            services.budgets.ledger,
            services.key_cache,
            admin_token,
            host,
            settings.authorize_port,
        )
        feed.start()
        atexit.register(feed.stop)

    return start


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from metering.app import create_app
    from metering.http.protocol import HttpLimits, protocol_class

    hooks: list[StartupHook] = []
    if args.demo:
        from metering.simulate.demo import demo_hook

        hooks.append(demo_hook)
    hooks.append(_tune_gc)
    if settings.authorize_port and settings.authorize_port == args.port:
        print(
            f"metering: invalid settings: METERING_AUTHORIZE_PORT: must differ from the main"
            f" port ({args.port})",
            file=sys.stderr,
        )
        return 2
    admin_token = _admin_token(settings)
    if settings.authorize_port:
        hooks.append(_authorize_replica(settings, admin_token, args.host))
    app = create_app(settings, admin_token, startup_hooks=hooks)
    print(
        f"metering: serving on http://{args.host}:{args.port} "
        "(API docs at /docs, OpenAPI at /openapi.json)",
        flush=True,
    )
    if settings.authorize_port:
        print(
            f"metering: POST /v1/authorize also on http://{args.host}:{settings.authorize_port}"
            " (its own process, started once the stores are ready)",
            flush=True,
        )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=protocol_class(HttpLimits.from_settings(settings)),
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=30,
    )
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from metering.clickhouse import migrations as ch_migrations
    from metering.clickhouse.client import make_client
    from metering.db import migrations as relational_migrations
    from metering.db.engine import make_engine

    engine = make_engine(settings.resolved_database_url)
    ch = make_client(settings.resolved_clickhouse_url, settings.clickhouse_database)
    if args.dry_run:
        for revision in relational_migrations.pending_revisions(engine):
            print(f"-- relational revision {revision}")
        relational_migrations.print_sql(engine)
        for migration in ch_migrations.pending(ch):
            print(f"-- clickhouse {migration.name}")
            for statement in migration.statements():
                print(statement + ";\n")
        return 0
    applied_relational = relational_migrations.upgrade(engine)
    applied_ch = [m.name for m in ch_migrations.migrate(ch)]
    print(f"relational: {', '.join(applied_relational) or 'up to date'}")
    print(f"clickhouse: {', '.join(applied_ch) or 'up to date'}")
    return 0


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    """List the jobs, or run one once on the stores without the ingest stack (no spool
    replay, no writer threads: see metering.scheduler for how an ingesting job still
    stores its rows exactly once)."""
    from metering.scheduler import JOBS, run_once
    from metering.services import Services

    if args.jobs_command == "list":
        for job in JOBS.values():
            print(f"{job.name}\t{job.description}")
        return 0
    if args.name not in JOBS:
        print(f"metering: no job {args.name!r}; jobs: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    services = Services.open(settings, _admin_token(settings))
    try:
        result = run_once(services, args.name)
        print(f"{args.name}: {result}")
    finally:
        services.close()
    return 0


def _invoices(args: argparse.Namespace, settings: Settings) -> int:
    from metering.invoices.cli import invoices_command

    return invoices_command(args, settings)


# -- metering simulate --------------------------------------------------------------------


def _iso_arg(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """`metering simulate backfill|live ...`"""
    from metering.simulate.live import LIVE_TENANTS
    from metering.simulate.model import SEED_MONTH_DAYS, SEED_MONTH_EVENTS, SEED_MONTH_TENANTS

    modes = parser.add_subparsers(dest="simulate_mode", required=True)
    fill = modes.add_parser(
        "backfill",
        help="write N days of simulated traffic straight into the stores",
        description="Write N days of simulated traffic (events, probes, tenants) straight "
        "into ClickHouse and the relational store, at engine speed. Refuses to run again "
        "with the same --seed (ids sim-<seed>-<n> are already stored).",
    )
    fill.add_argument("--days", type=float, required=True, help="length of the window")
    fill.add_argument(
        "--events",
        type=int,
        default=None,
        help=f"events in the window (default {SEED_MONTH_EVENTS:,} per "
        f"{SEED_MONTH_DAYS} days, the seed page's figure)",
    )
    fill.add_argument(
        "--tenants",
        type=int,
        default=SEED_MONTH_TENANTS,
        help="developer accounts (default %(default)s)",
    )
    fill.add_argument("--seed", type=int, default=1, help="RNG seed and id prefix (default 1)")
    fill.add_argument(
        "--end",
        type=_iso_arg,
        default=None,
        help="end of the window, ISO 8601 (default now; naive = UTC)",
    )
    run = modes.add_parser(
        "live",
        help="send simulated traffic in real time through the HTTP API",
        description="Generate events in real time (timestamps = now) and send them with "
        "the gateway client (metering.client.MeteringClient), plus provider probes.",
    )
    run.add_argument("--url", default="http://127.0.0.1:8000")
    run.add_argument("--key", required=True, help="an API key with the ingest scope")
    run.add_argument("--rate", type=float, required=True, help="events per second")
    run.add_argument("--duration", type=float, required=True, help="seconds to run")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument(
        "--tenants", type=int, default=LIVE_TENANTS, help="developer accounts (default %(default)s)"
    )


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    if args.simulate_mode == "backfill":
        return _simulate_backfill(args, settings)
    if args.simulate_mode == "live":
        return _simulate_live(args)
    return 2


def _simulate_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from metering.clickhouse import migrations as ch_migrations
    from metering.clickhouse.client import make_client
    from metering.db import migrations as relational_migrations
    from metering.db.engine import make_engine
    from metering.simulate.backfill import BackfillError, BackfillPlan, backfill
    from metering.simulate.model import SEED_MONTH_DAYS, SEED_MONTH_EVENTS

    events = args.events
    if events is None:
        events = round(SEED_MONTH_EVENTS * args.days / SEED_MONTH_DAYS)
    plan = BackfillPlan(
        days=args.days,
        events=events,
        tenants=args.tenants,
        seed=args.seed,
        end=args.end or datetime.now(UTC),
    )
    try:
        plan.validate(datetime.now(UTC))
    except BackfillError as exc:
        print(f"metering simulate: {exc}", file=sys.stderr)
        return 2
    lock = None
    if settings.uses_chdb:
        lock = lock_or_explain(settings.data_dir)
        if lock is None:
            return 1
    try:
        engine = make_engine(settings.resolved_database_url)
        ch = make_client(settings.resolved_clickhouse_url, settings.clickhouse_database)
        relational_migrations.upgrade(engine)
        ch_migrations.migrate(ch)
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            elapsed = time.perf_counter() - started
            print(
                f"  {done:,}/{total:,} events ({done / elapsed:,.0f}/s)",
                file=sys.stderr,
                flush=True,
            )

        try:
            report = backfill(ch, engine, plan, progress=progress)
        except BackfillError as exc:
            print(f"metering simulate: {exc}", file=sys.stderr)
            return 1
        finally:
            engine.dispose()
        start = datetime.fromtimestamp(plan.start_ms / 1000, UTC)
        print(
            f"backfill {plan.prefix}: {report.events:,} events, {report.probes:,} probes, "
            f"{report.tenants:,} tenants / {report.projects:,} projects, "
            f"{start:%Y-%m-%d %H:%M:%S} .. {plan.end.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC, "
            f"{report.seconds:.1f} s "
            f"({report.rows_per_second:,.0f} events/s)"
        )
        if not settings.uses_chdb:
            print(
                "note: restart any running `metering serve` on this ClickHouse so that its "
                "dedup gate learns the new ids"
            )
        return 0
    finally:
        if lock is not None:
            lock.release()


def _simulate_live(args: argparse.Namespace) -> int:
    from metering.client import MeteringClient
    from metering.simulate.live import live

    if args.rate <= 0 or args.duration <= 0 or args.tenants < 1:
        print(
            "metering simulate: --rate and --duration must be > 0, --tenants >= 1", file=sys.stderr
        )
        return 2
    sender = MeteringClient(args.url, args.key, max_batch=1000, flush_interval=1.0)
    try:
        report = live(
            sender, rate=args.rate, duration=args.duration, seed=args.seed, tenants=args.tenants
        )
    except KeyboardInterrupt:
        sender.close(timeout=10.0)
        print("metering simulate: interrupted", file=sys.stderr)
        return 130
    sender.close(timeout=30.0)
    stats = sender.stats()
    print(
        f"live: {report.generated_events:,} events and {report.generated_probes:,} probes in "
        f"{report.seconds:.1f} s; sent {stats.get('sent', 0):,}, "
        f"accepted {stats.get('accepted', 0):,}, duplicates {stats.get('duplicates', 0):,}, "
        f"rejected {stats.get('rejected', 0):,}, dead-lettered "
        f"{stats.get('dead_lettered', 0):,}, pending {stats.get('pending', 0):,}"
    )
    return 0 if not stats.get("rejected") and not stats.get("dead_lettered") else 1


if __name__ == "__main__":
    sys.exit(main())
