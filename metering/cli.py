"""The `metering` console script.

    metering serve [--host 127.0.0.1] [--port 8000] [--demo]
    metering migrate [--dry-run]
    metering simulate backfill|live ...
    metering jobs list | metering jobs run NAME

Settings come from METERING_* variables (and an optional .env), read once here.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence

from metering.datadir import ensure_admin_token, lock_or_explain
from metering.settings import Settings


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
    from metering import simulate as simulate_module

    simulate_module.add_arguments(simulate)

    jobs = commands.add_parser("jobs", help="list the scheduler's jobs or run one once")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_commands.add_parser("list")
    run = jobs_commands.add_parser("run")
    run.add_argument("name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("alembic", "apscheduler", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's ValidationError names the variable
        print(f"metering: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.command == "simulate":
        from metering import simulate as simulate_module

        return simulate_module.main(args, settings)
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


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from metering.app import StartupHook, create_app

    hooks: list[StartupHook] = []
    if args.demo:
        from metering import simulate as simulate_module

        hooks.append(simulate_module.demo_hook)
    hooks.append(_tune_gc)
    app = create_app(settings, _admin_token(settings), startup_hooks=hooks)
    print(
        f"metering: serving on http://{args.host}:{args.port} "
        "(API docs at /docs, OpenAPI at /openapi.json)",
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
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
    from metering.scheduler import JOBS
    from metering.services import Services

    if args.jobs_command == "list":
        for job in JOBS.values():
            print(f"{job.name}\t{job.description}")
        return 0
    if args.name not in JOBS:
        print(f"metering: no job {args.name!r}; jobs: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    job = JOBS[args.name]
    services = Services.open(settings, _admin_token(settings))
    try:
        services.start()
        services.ready = True
        result = job.run(services)
        print(f"{job.name}: {result}")
    finally:
        services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
