"""The data a bench/authorize.py run needs: tenants, budgets, prices, seed usage.

- `Universe`: N tenants (the accounts bench/loadgen.py's events use, then synthetic ones
  up to N), each with 1-3 projects; a fraction of them budgeted (tenant-wide, per project,
  or both; some hard), with amounts chosen so that some hard budgets are exhausted.
- `PRICES`: one price entry per (provider, model) the load generator sends.
- `seed_lines`: a few events per tenant (1-3 models for a budgeted one, so each budgeted
  scope holds usage under 1-3 price entries); ingesting them registers every tenant.
- `insert_budgets`: budget rows written into the service's SQLite store while the server
  is stopped (the server loads them and rebuilds their spend from ClickHouse at start),
  instead of one POST /v1/budgets (and its resync) per budget.
- `post_prices` / `post_budgets`: the same over the public API, for bench/ingest.py's
  `--budgets-fraction`.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from bench import loadgen
from bench.ingest_server import http

LOADGEN_SEED = 20261127  # bench/ingest.py's default --seed
LOADGEN_TENANTS = 5_000  # bench/loadgen.build_lines' default `tenants`
PRICE_FROM = "2026-01-01T00:00:00+00:00"


def _prices() -> list[dict[str, str]]:
    out = []
    for n, (provider, models) in enumerate(loadgen.PROVIDERS.items()):
        for m, model in enumerate(models):
            out.append(
                {
                    "provider": provider,
                    "model": model,
                    "effective_from": PRICE_FROM,
                    "currency": "USD",
                    "input_per_1m_tokens": f"0.{10 + 5 * n + m:02d}",
                    "output_per_1m_tokens": "0",
                    "per_1k_doc_query_pairs": f"0.{20 + 3 * m + n:02d}",
                }
            )
    return out


PRICES = _prices()
MODELS: list[tuple[str, str]] = [(p["provider"], p["model"]) for p in PRICES]


def loadgen_accounts(seed: int = LOADGEN_SEED, tenants: int = LOADGEN_TENANTS) -> list[Account]:
    """The accounts `loadgen.build_lines(seed=seed, tenants=tenants)` draws its events'
    tenants and projects from (the generator's first draws, made the same way)."""
    rng = random.Random(seed)
    names = [f"acct_{rng.getrandbits(40):010x}" for _ in range(tenants)]
    projects = [tuple(f"proj_{name[5:13]}_{p}" for p in range(rng.randint(1, 3))) for name in names]
    accounts = [Account(n, p) for n, p in zip(names, projects, strict=True)]
    # Check against the generator itself: every tenant/project of its events is ours.
    known = {(a.tenant, p) for a in accounts for p in a.projects}
    sample = loadgen.build_lines(2_000, seed=seed, run_id="check", base_epoch=0.0)
    for tenant, project in tenants_of_lines(sample):
        if (tenant, project) not in known:
            raise RuntimeError(f"loadgen_accounts out of step with loadgen: {tenant}/{project}")
    return accounts


_TENANT = re.compile(rb'"tenant_id":"([^"]+)","project_id":"([^"]+)"')


def tenants_of_lines(lines: Iterable[bytes]) -> list[tuple[str, str]]:
    """Distinct (tenant, project) pairs of loadgen event lines, in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for line in lines:
        match = _TENANT.search(line)
        if match is not None:
            seen.setdefault((match[1].decode(), match[2].decode()), None)
    return list(seen)


@dataclass(frozen=True)
class Account:
    tenant: str
    projects: tuple[str, ...]


@dataclass(frozen=True)
class Budget:
    tenant: str
    project: str | None
    amount: Decimal
    hard: bool


@dataclass
class Universe:
    accounts: list[Account]
    budgeted: list[Account]
    unbudgeted: list[Account]
    budgets: list[Budget]


AMOUNTS = (
    (Decimal("0.000001"), 0.05),  # exhausted by any priced usage
    (Decimal("0.05"), 0.25),
    (Decimal("5.00"), 0.4),
    (Decimal("500.00"), 0.3),
)


def _amount(rng: random.Random) -> Decimal:
    x = rng.random()
    for amount, weight in AMOUNTS:
        if x < weight:
            return amount
        x -= weight
    return AMOUNTS[-1][0]


def plan_budgets(
    accounts: Sequence[Account], fraction: float, seed: int
) -> tuple[list[Account], list[Budget]]:
    """Budget `fraction` of the accounts: 60% tenant-wide, 25% one project, 15% both;
    30% of budgets hard."""
    rng = random.Random(seed)
    count = round(len(accounts) * fraction)
    chosen = rng.sample(list(accounts), count)
    budgets: list[Budget] = []
    for account in chosen:
        kind = rng.random()
        if kind < 0.6 or kind >= 0.85:
            budgets.append(Budget(account.tenant, None, _amount(rng), rng.random() < 0.3))
        if kind >= 0.6:
            project = rng.choice(account.projects)
            budgets.append(Budget(account.tenant, project, _amount(rng), rng.random() < 0.3))
    return chosen, budgets


def universe(tenants: int, fraction: float, seed: int) -> Universe:
    """`tenants` accounts: loadgen's, then synthetic ones; `fraction` of them budgeted."""
    rng = random.Random(seed)
    accounts = loadgen_accounts()[:tenants]
    n = len(accounts)
    while len(accounts) < tenants:
        projects = tuple(f"proj_b{n:06d}_{p}" for p in range(rng.randint(1, 3)))
        accounts.append(Account(f"acct_b{n:06d}", projects))
        n += 1
    budgeted, budgets = plan_budgets(accounts, fraction, seed + 1)
    names = {a.tenant for a in budgeted}
    unbudgeted = [a for a in accounts if a.tenant not in names]
    return Universe(accounts, budgeted, unbudgeted, budgets)


def seed_lines(u: Universe, seed: int, run_id: str, end: datetime) -> list[bytes]:
    """One event per unbudgeted tenant; for a budgeted one, one event per model of 1-3
    models in each of its projects (so each budgeted scope has usage under 1-3 price
    entries). Timestamps spread over the half hour before `end` (same month)."""
    rng = random.Random(seed)
    budgeted = {a.tenant for a in u.budgeted}
    lines: list[bytes] = []
    start = max(end - timedelta(minutes=30), end.replace(day=1, hour=0, minute=0, second=0))
    span = (end - start).total_seconds()
    for account in u.accounts:
        if account.tenant in budgeted:
            models = rng.sample(MODELS, rng.randint(1, 3))
            pairs = [(p, m) for p in account.projects for m in models]
        else:
            pairs = [(account.projects[0], rng.choice(MODELS))]
        for project, (provider, model) in pairs:
            ts = start + timedelta(seconds=rng.random() * span)
            documents = rng.randint(1, 200)
            event = {
                "event_id": f"seed_{run_id}_{len(lines):09d}",
                "timestamp": ts.isoformat(timespec="milliseconds"),
                "tenant_id": account.tenant,
                "project_id": project,
                "provider": provider,
                "model": model,
                "status": "ok",
                "http_status": 200,
                "queries": 1,
                "documents": documents,
                "input_tokens": documents * rng.randint(40, 160),
                "output_tokens": 0,
                "latency_ms": 80.0,
            }
            lines.append(json.dumps(event, separators=(",", ":")).encode())
    return lines


def insert_budgets(database: Path, budgets: Sequence[Budget], now: datetime) -> int:
    """Write budget rows into the (stopped) server's SQLite store; returns the count."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from billing.budgets.models import BudgetRow

    engine = create_engine(f"sqlite:///{database}")
    try:
        with Session(engine) as session:
            session.add_all(
                BudgetRow(
                    id="bud_" + secrets.token_hex(12),
                    tenant_id=b.tenant,
                    project_id=b.project,
                    amount_usd=b.amount,
                    period="monthly",
                    thresholds=["0.5", "0.8", "1"],
                    hard_limit=b.hard,
                    channels=[],
                    created_at=now,
                    updated_at=now,
                )
                for b in budgets
            )
            session.commit()
    finally:
        engine.dispose()
    return len(budgets)


def post_prices(base: str, admin: str) -> None:
    for price in PRICES:
        status, body = http("POST", f"{base}/v1/prices", token=admin, body=dict(price))
        if status not in (200, 201):
            raise RuntimeError(f"POST /v1/prices: {status} {body[:300]!r}")


def post_budgets(base: str, admin: str, budgets: Sequence[Budget]) -> None:
    for b in budgets:
        status, body = http(
            "POST",
            f"{base}/v1/budgets",
            token=admin,
            body={
                "tenant_id": b.tenant,
                "project_id": b.project,
                "amount_usd": str(b.amount),
                "thresholds": [0.5, 0.8, 1.0],
                "hard_limit": b.hard,
            },
            timeout=60,
        )
        if status != 201:
            raise RuntimeError(f"POST /v1/budgets: {status} {body[:300]!r}")


def budgets_for_lines(
    lines: Sequence[bytes], fraction: float, seed: int
) -> tuple[int, list[Budget]]:
    """For bench/ingest.py: budgets on `fraction` of the tenants the run's events use
    (returns the number of tenants seen and the budgets)."""
    projects: dict[str, list[str]] = {}
    for tenant, project in tenants_of_lines(lines):
        projects.setdefault(tenant, []).append(project)
    accounts = [Account(t, tuple(p)) for t, p in projects.items()]
    _, budgets = plan_budgets(accounts, fraction, seed)
    return len(accounts), budgets


def now_utc() -> datetime:
    return datetime.now(UTC)
