"""Spend and budgets: the billable quantities per provider and model.

Prices are not in ClickHouse: they are versioned entries in the relational store
(billing/prices), and a price book has to be applied per span in which one entry holds
(billing/rating.py), exactly, in Decimal. Pricing in Grafana's SQL would need a copy of
the price book in ClickHouse (a table the service mirrors, or a dictionary over the
relational store) and a second implementation of rating that could disagree with the
invoices. So this board shows the quantities the service prices (the three meters:
doc-query pairs, input tokens and output tokens of ok events, per provider and model),
and points to the service for the money: `GET /v1/usage` (cost_usd), `GET /v1/budgets`
and the built-in dashboard. The platform-wide panels read the p_hourly rollup.
"""

from __future__ import annotations

from metering.dashboards.spec import EDGES, SERIES_HOURS, WHOLE_HOURS, WINDOW, Board, Panel

NOTE = """**Money is computed by the service, not here.** Prices are versioned in the \
service's relational store and rated exactly (Decimal) per price period, so these panels \
show the quantities it prices: the three meters of `ok` events (doc-query pairs, input \
tokens, output tokens) per provider and model.

Spend in USD: `GET /v1/usage?granularity=day&group_by=provider,model` (`cost_usd`), \
`GET /v1/stats` (`spend_usd`). Budgets, their spend, forecast and alerts: \
`GET /v1/budgets`, and the service's own dashboard at `/dashboard`."""


# p_hourly's exact sums (UInt128: a UInt64 sum of UInt64 columns can wrap), per hour;
# shown as UInt64, which every client and Grafana's plugin read as numbers: a day's or a
# range's quantities are far below 2^64.
_SUMS = {
    "doc_query_pairs": "sum(toUInt128(queries) * documents)",
    "input_tokens": "sum(toUInt128(input_tokens))",
    "output_tokens": "sum(toUInt128(output_tokens))",
}


def _daily(meter: str) -> str:
    return f"""SELECT toStartOfDay(hour) AS time, concat(provider, ' / ', model) AS provider_model,
  toUInt64(sum(m)) AS {meter}
FROM (
  SELECT toStartOfHour(timestamp) AS hour, provider, model, {_SUMS[meter]} AS m
  FROM rerank_events WHERE {SERIES_HOURS} AND status = 'ok'
  GROUP BY hour, provider, model
)
GROUP BY time, provider_model
ORDER BY time, provider_model"""


PAIRS_DAILY = _daily("doc_query_pairs")
INPUT_DAILY = _daily("input_tokens")
OUTPUT_DAILY = _daily("output_tokens")


_PARTS = {"doc_query_pairs": "d", "input_tokens": "i", "output_tokens": "o"}


def _usage_part(where: str) -> str:
    return (
        "SELECT provider, model, count() AS c, "
        + ", ".join(f"{_SUMS[meter]} AS {alias}" for meter, alias in _PARTS.items())
        + f"\n  FROM rerank_events WHERE {where} AND status = 'ok'\n  GROUP BY provider, model"
    )


# [from, to) exactly: whole hours from p_hourly, the edges from rows.
USAGE_BY_MODEL = f"""SELECT provider, model, sum(c) AS billable_requests,
  toUInt64(sum(d)) AS doc_query_pairs, toUInt64(sum(i)) AS input_tokens_sum,
  toUInt64(sum(o)) AS output_tokens_sum
FROM (
  {_usage_part(WHOLE_HOURS)}
  UNION ALL
  {_usage_part(EDGES)}
)
GROUP BY provider, model
ORDER BY provider, model"""

# Per tenant: no rollup has tenants, so this one reads the range's rows.
TOP_TENANTS = f"""SELECT tenant_id, count() AS billable_requests,
  sum(toUInt64(queries) * documents) AS doc_query_pairs,
  sum(input_tokens) AS input_tokens_sum, sum(output_tokens) AS output_tokens_sum
FROM rerank_events
WHERE {WINDOW} AND status = 'ok'
GROUP BY tenant_id
ORDER BY doc_query_pairs DESC, tenant_id
LIMIT 50"""

BOARD = Board(
    uid="rerank-spend",
    title="Rerank metering: spend and budgets",
    description="Billable quantities per provider and model (the meters the service "
    "prices); spend in USD and budgets are read from the service.",
    panels=(
        Panel("How spend is shown", "text", content=NOTE, width=24, height=5),
        Panel(
            "Doc-query pairs per day by provider / model",
            "bars",
            PAIRS_DAILY,
            ("time", "provider_model", "doc_query_pairs"),
            labels=("provider_model",),
            width=24,
            rollup=True,
        ),
        Panel(
            "Input tokens per day by provider / model",
            "bars",
            INPUT_DAILY,
            ("time", "provider_model", "input_tokens"),
            labels=("provider_model",),
            rollup=True,
        ),
        Panel(
            "Output tokens per day by provider / model",
            "bars",
            OUTPUT_DAILY,
            ("time", "provider_model", "output_tokens"),
            labels=("provider_model",),
            rollup=True,
        ),
        Panel(
            "Billable usage by provider / model",
            "table",
            USAGE_BY_MODEL,
            (
                "provider",
                "model",
                "billable_requests",
                "doc_query_pairs",
                "input_tokens_sum",
                "output_tokens_sum",
            ),
            description="Σ over ok events in [from, to): what the invoices price "
            "(per 1K pairs, per 1M tokens).",
            rollup=True,
        ),
        Panel(
            "Top tenants by doc-query pairs",
            "table",
            TOP_TENANTS,
            (
                "tenant_id",
                "billable_requests",
                "doc_query_pairs",
                "input_tokens_sum",
                "output_tokens_sum",
            ),
        ),
    ),
)
