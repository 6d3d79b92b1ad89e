"""The dashboard's sections, rendered to HTML as the page streams (metering/dashboard/routes.py).

Each section awaits the queries it shows (started together by `data.start_all`) and returns
its markup; a section that fails is replaced by a short notice, not a blank page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from billing.budgets import service as budgets
from billing.invoices.models import InvoiceRow
from billing.rating import money
from metering.budgets.runtime import BudgetRuntime
from metering.dashboard import charts

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
page: Any = _env.get_template("page.html").module

Tasks = Mapping[str, "asyncio.Future[Any]"]
Query = Callable[..., str]

CARDS = (
    ("documents_reranked", "Documents reranked"),
    ("requests", "API requests"),
    ("active_accounts", "Active developer accounts"),
    ("avg_uptime_pct", "Average uptime"),
)


def _change(now: float | None, before: float | None) -> tuple[str, str]:
    if now is None or before is None:
        return "no earlier data", "flat"
    if before == 0:
        return ("new in this window", "up") if now else ("no change", "flat")
    if now > before * 100:
        return f"up from {charts.compact(before)} in the previous window", "up"
    pct = (now - before) / before * 100
    trend = "up" if pct > 0 else "down" if pct < 0 else "flat"
    return f"{pct:+.1f}% vs previous window", trend


async def _cards(state: Any, tasks: Tasks, tenant: Any, window: str, query: Query, p: Any) -> str:
    stats, previous = await tasks["stats"], await tasks["previous"]
    changes = []
    for key, label in CARDS:
        value = stats[key]
        if key == "avg_uptime_pct":
            text = "no probes" if value is None else f"{value:.2f}%"
            data = "" if value is None else repr(value)
        else:
            text, data = charts.compact(value), str(value)
        change, trend = _change(value, previous[key])
        if key == "avg_uptime_pct" and value is not None and previous[key] is not None:
            change = f"{value - previous[key]:+.2f} points vs previous window"
        changes.append(
            {
                "key": key,
                "label": label,
                "value": data,
                "text": text,
                "change": change,
                "trend": trend,
            }
        )
    shown = dict(stats)
    shown["spend_text"] = "$" + _money_text(Decimal(stats["spend_usd"]))
    shown["errors_text"] = charts.compact(stats["errors"])
    return str(page.cards(shown, changes, window))


def _money_text(value: Decimal) -> str:
    if value >= 1000:
        return charts.compact(float(value))
    return f"{value:.2f}"


async def _usage(state: Any, tasks: Tasks, tenant: Any, window: str, query: Query, p: Any) -> str:
    usage = await tasks["usage"]
    uptime, incidents = await tasks["uptime"]
    rows = usage["series"]

    def t(row: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(row["bucket"].replace("Z", "+00:00"))

    unit = "hour" if usage["granularity"] == "hour" else "day"
    parts = [
        '<section aria-labelledby="usage-h" class="grid"><h2 id="usage-h">Usage per '
        + unit
        + "</h2>"
    ]
    for key, title in (("requests", "Requests"), ("documents", "Documents reranked")):
        svg = charts.line_chart(
            f"{title} per {unit}", [charts.Series(title, [(t(r), r[key]) for r in rows])]
        )
        parts.append(
            page.chart(
                f"{title} per {unit}", svg, ["time", title], [(r["bucket"], r[key]) for r in rows]
            )
        )
    spend = [(t(r), float(Decimal(r["cost_usd"] or "0"))) for r in rows]
    svg = charts.line_chart(
        f"Spend (USD) per {unit}", [charts.Series("spend", spend)], lambda v: f"${v:,.2f}"
    )
    parts.append(
        page.chart(
            f"Spend per {unit}", svg, ["time", "USD"], [(r["bucket"], r["cost_usd"]) for r in rows]
        )
    )
    svg = charts.line_chart(
        "Uptime (%) from probes", [charts.Series("uptime", uptime)], lambda v: f"{v:.1f}%"
    )

    def item(i: Any) -> str:
        shown = i.as_json()
        return (
            f"<tr><td>{escape(i.provider)}</td><td>{escape(i.region)}</td>"
            f"<td>{escape(shown['started_at'])}</td><td>{escape(shown['ended_at'] or 'ongoing')}</td>"
            f"<td>{i.failed_probes}</td></tr>"
        )

    parts.append(
        page.chart(
            "Uptime per " + unit,
            svg,
            ["time", "uptime %"],
            [(a.isoformat(), f"{b:.3f}") for a, b in uptime],
        )
    )
    head = (
        '<table class="incidents"><thead><tr><th scope="col">Provider</th><th scope="col">Region</th>'
        '<th scope="col">Started</th><th scope="col">Ended</th><th scope="col">Failed probes</th></tr></thead><tbody>'
    )
    shown = "".join(item(i) for i in incidents[:5])
    rest = "".join(item(i) for i in incidents[5:100])
    parts.append(
        '<section class="panel wide" aria-labelledby="inc-h">'
        f'<h3 id="inc-h">Incidents ({len(incidents)})</h3>'
        + (
            f'<div class="scroll">{head}{shown}</tbody></table></div>'
            if shown
            else "<p>No incidents in this window.</p>"
        )
        + (
            f'<details><summary>{len(incidents) - 5} more</summary><div class="scroll">{head}{rest}</tbody></table></div></details>'
            if rest
            else ""
        )
        + "</section></section>"
    )
    return "".join(str(x) for x in parts)


async def _providers(
    state: Any, tasks: Tasks, tenant: Any, window: str, query: Query, p: Any
) -> str:
    providers = (await tasks["providers"])["providers"]
    names = [x["provider"] for x in providers]
    lat = [(q, [float(x["latency_ms"][q] or 0) for x in providers]) for q in ("p50", "p95", "p99")]
    err = [("error rate %", [100 * float(x["error_rate"] or 0) for x in providers])]
    rows = []
    for x in providers:
        price = ", ".join(
            f"{escape(e['model'])}: ${escape(e['input_per_1m_tokens'])}/1M in"
            + (
                f", ${escape(e['per_1k_doc_query_pairs'])}/1K pairs"
                if e["per_1k_doc_query_pairs"] != "0"
                else ""
            )
            for e in x["prices"]
        )
        up = "-" if x["uptime_pct"] is None else f"{x['uptime_pct']:.2f}%"
        p50 = x["latency_ms"]["p50"]
        rows.append(
            f'<tr><th scope="row">{escape(x["provider"])}</th><td>{"-" if p50 is None else f"{p50:.0f} ms"}</td>'
            f"<td>{charts.compact(x['requests'])}</td><td>{x['peak_rps']}</td><td>{up}</td>"
            f"<td>{100 * (x['error_rate'] or 0):.2f}%</td><td>{price}</td></tr>"
        )
    table = (
        '<div class="scroll"><table class="providers"><caption>Provider comparison</caption><thead><tr>'
        '<th scope="col">Provider</th><th scope="col">Latency p50</th><th scope="col">Requests</th>'
        '<th scope="col">Peak req/s</th><th scope="col">Uptime</th><th scope="col">Errors</th>'
        '<th scope="col">Prices</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></div>"
    )
    lat_svg = charts.bar_chart(
        "Latency percentiles (ms) per provider", names, lat, lambda v: f"{v:.0f}"
    )
    err_svg = charts.bar_chart("Error rate (%) per provider", names, err, lambda v: f"{v:.1f}%")
    return (
        '<section aria-labelledby="prov-h" class="grid"><h2 id="prov-h">Providers</h2>'
        + table
        + str(
            page.chart(
                "Latency p50 / p95 / p99 (ms)",
                lat_svg,
                ["provider", "p50", "p95", "p99"],
                [(n, *(f"{g[1][i]:.1f}" for g in lat)) for i, n in enumerate(names)],
            )
        )
        + str(
            page.chart(
                "Error rate",
                err_svg,
                ["provider", "error rate %"],
                [(n, f"{err[0][1][i]:.3f}") for i, n in enumerate(names)],
            )
        )
        + "</section>"
    )


async def _budgets(state: Any, tasks: Tasks, tenant: Any, window: str, query: Query, p: Any) -> str:
    runtime: BudgetRuntime = state.budgets

    def load() -> list[dict[str, Any]]:
        with state.sessions() as db:
            rows = budgets.live(db, tenant)[:50]
            out = []
            for row in rows:
                limit = budgets.to_limit(row)
                spend, _ = runtime.ledger.spend(limit.scope)
                alerts = budgets.alerts_of(db, row.id)
                out.append(
                    {
                        "row": row,
                        "spend": spend,
                        "forecast": runtime.forecast(limit) if runtime.started else None,
                        "alerts": alerts,
                    }
                )
            return out

    items = await run_in_threadpool(load)
    if not items:
        return '<section aria-labelledby="bud-h"><h2 id="bud-h">Budgets</h2><p>No budgets.</p></section>'
    parts = ['<section aria-labelledby="bud-h"><h2 id="bud-h">Budgets</h2><ul class="budgets">']
    for item in items:
        row = item["row"]
        amount = row.amount_usd
        pct = float(item["spend"] / amount * 100) if amount else 0.0
        scope = escape(row.tenant_id + (f" / {row.project_id}" if row.project_id else ""))
        alerts = "".join(
            f"<li>{escape(a.period)}: {'threshold ' + escape(a.threshold) if a.kind == 'threshold' else 'forecast'}"
            f" at ${escape(money(a.spend_usd))} ({escape(budgets.iso(a.at))})</li>"
            for a in item["alerts"][-10:]
        )
        forecast = item["forecast"]
        parts.append(
            f'<li class="budget"><h3>{scope}{" · hard limit" if row.hard_limit else ""}</h3>'
            f"<label>${escape(money(item['spend']))} of ${escape(money(amount))}"
            f'<progress max="100" value="{min(pct, 100):.1f}">{pct:.1f}%</progress></label>'
            f"<p>{pct:.1f}% used"
            + (f" · month-end forecast ${escape(money(forecast))}" if forecast is not None else "")
            + "</p>"
            + (
                f"<details><summary>Alerts ({len(item['alerts'])})</summary><ul>{alerts}</ul></details>"
                if alerts
                else ""
            )
            + "</li>"
        )
    parts.append("</ul></section>")
    return "".join(parts)


async def _invoices(
    state: Any, tasks: Tasks, tenant: Any, window: str, query: Query, p: Any
) -> str:
    def load() -> list[InvoiceRow]:
        with state.sessions() as db:
            q = select(InvoiceRow)
            if tenant is not None:
                q = q.where(InvoiceRow.tenant_id == tenant)
            q = q.order_by(InvoiceRow.period.desc(), InvoiceRow.tenant_id).limit(24)
            return list(db.scalars(q))

    rows = await run_in_threadpool(load)
    head = '<section aria-labelledby="inv-h"><h2 id="inv-h">Invoices</h2>'
    if not rows:
        return (
            head + "<p>No invoices yet: a month's invoices are drafted when it ends.</p></section>"
        )
    body = "".join(
        f"<tr><td>{escape(r.period)}</td><td>{escape(r.tenant_id)}</td><td>{'-' if r.number is None else r.number}</td>"
        f"<td>{escape(r.status)}</td><td>${escape(f'{r.total_usd:.2f}')}</td>"
        f'<td><a href="/dashboard/invoices/{escape(r.id)}.html">HTML</a> · '
        f'<a href="/dashboard/invoices/{escape(r.id)}.pdf">PDF</a></td></tr>'
        for r in rows
    )
    return (
        head
        + '<div class="scroll"><table><thead><tr><th scope="col">Period</th><th scope="col">Tenant</th>'
        '<th scope="col">Number</th><th scope="col">Status</th><th scope="col">Total</th><th scope="col">View</th>'
        f"</tr></thead><tbody>{body}</tbody></table></div></section>"
    )


async def _requests(
    state: Any, tasks: Tasks, tenant: Any, window: str, query: Query, p: Any
) -> str:
    page = await tasks["requests"]
    rows = "".join(
        f"<tr><td>{escape(e['timestamp'])}</td><td>{escape(e['tenant_id'])}</td><td>{escape(e['project_id'])}</td>"
        f"<td>{escape(e['provider'])}</td><td>{escape(e['model'])}</td><td>{escape(e['status'])}</td>"
        f"<td>{e['documents']}</td><td>{e['input_tokens']}</td><td>{e['latency_ms']:.0f} ms</td>"
        f"<td>{len(e['fallbacks'])}</td></tr>"
        for e in page.events
    )
    more = (
        f'<a href="?{escape(query(cursor=page.next_cursor))}#log-h" rel="next">Older requests →</a>'
        if page.next_cursor
        else "<span>End of the log for this window.</span>"
    )
    return (
        '<section aria-labelledby="log-h"><h2 id="log-h">Request log</h2>'
        '<form class="filters" method="get" action="/dashboard#log-h">'
        f'<input type="hidden" name="window" value="{escape(window)}">'
        + (
            f'<input type="hidden" name="tenant_id" value="{escape(tenant)}">'
            if tenant and p.is_admin
            else ""
        )
        + "".join(
            f'<label>{label} <input name="{name}" value="{escape(query_value)}" maxlength="128"></label>'
            for name, label, query_value in (
                ("project_id", "Project", _param(query, "project_id")),
                ("provider", "Provider", _param(query, "provider")),
                ("model", "Model", _param(query, "model")),
            )
        )
        + '<label>Status <select name="status"><option value="">any</option>'
        + "".join(
            f'<option value="{s}"{" selected" if _param(query, "status") == s else ""}>{s}</option>'
            for s in ("ok", "error")
        )
        + '</select></label><button type="submit">Filter</button></form>'
        '<div class="scroll"><table class="log"><caption>Newest first</caption><thead><tr>'
        + "".join(
            f'<th scope="col">{h}</th>'
            for h in (
                "Time",
                "Tenant",
                "Project",
                "Provider",
                "Model",
                "Status",
                "Docs",
                "Input tokens",
                "Latency",
                "Fallbacks",
            )
        )
        + f'</tr></thead><tbody>{rows}</tbody></table></div><p class="more">{more}</p></section>'
    )


def _param(query: Query, name: str) -> str:
    values = parse_qs(query())
    return (values.get(name) or [""])[0]


SECTIONS = (_cards, _usage, _providers, _budgets, _invoices, _requests)
