"""The close's bulk line writer: lines stored as built (COPY on PostgreSQL, INSERTs on
SQLite), text with COPY's special characters included; fresh ids ascending."""

from __future__ import annotations

import itertools
import re
from decimal import Decimal

from billing.invoices import repository as repo
from billing.invoices.builder import LineTuple
from metering.services import Services


def test_lines_are_stored_as_built_whatever_their_text(services: Services) -> None:
    odd = "proj\t1\\n\nx\r"
    lines: list[LineTuple] = [
        (
            "proj-1",
            "cohere",
            "rerank-3",
            "input_tokens",
            "price_a",
            12,
            "0.25",
            "0.01",
            "2026-09",
            False,
        ),
        (
            "proj-1",
            "cohere",
            "rerank-3",
            "doc_query_pairs",
            None,
            7,
            None,
            "0.00",
            "2026-09",
            False,
        ),
        (odd, "az\\ure", "m\tn", "output_tokens", "p\\N", 5, "1.5", "12.34", "2026-08", True),
        (
            "proj-2",
            "llmapi",
            "\\N",
            "input_tokens",
            "price_b",
            10**15,
            "0.000000000001",
            "0.00",
            "2026-09",
            False,
        ),
    ]
    ids = list(itertools.islice(repo.ordered_invoice_ids(), 3))
    assert ids == sorted(ids) and all(re.fullmatch("inv_[0-9a-f]{24}", i) for i in ids)
    with services.sessions.begin() as session:
        with repo.line_writer(session) as writer:
            writer.write(ids[0], lines)
            writer.write(ids[1], lines[:1])
            writer.write(ids[2], [])
        assert writer.lines == 5
    with services.sessions() as session:
        stored = repo.lines_of(session, ids)
    assert [len(stored[i]) for i in ids] == [4, 1, 0]
    got = [
        (
            r.project_id,
            r.provider,
            r.model,
            r.meter,
            r.price_id,
            r.quantity,
            None if r.unit_price_usd is None else format(r.unit_price_usd, "f"),
            format(r.amount_usd, "f"),
            r.usage_period,
            r.late,
        )
        for r in stored[ids[0]]
    ]
    assert got == lines
    assert [r.position for r in stored[ids[0]]] == [0, 1, 2, 3]
    assert stored[ids[0]][1].unit == "1K pairs" and stored[ids[0]][1].stripe_item_id is None
    assert stored[ids[0]][2].amount_usd == Decimal("12.34")
