"""The month's close over the API and the CLI: lines equal a brute-force computation to
the cent across mid-month price changes, numbering without gaps, idempotent runs, a
finalized invoice that never changes, late usage billed once, the audit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from billing.invoices.models import InvoiceLineRow
from metering.services import Services
from tests.invoices.conftest import CliRunner
from tests.invoices.helpers import (
    brute_lines,
    brute_quantities,
    got_lines,
    iso,
    post_events,
    workload,
)

AUG = datetime(2026, 8, 1, tzinfo=UTC)
SEP = datetime(2026, 9, 1, tzinfo=UTC)
OCT = datetime(2026, 10, 1, tzinfo=UTC)
NOV = datetime(2026, 11, 1, tzinfo=UTC)
TENANTS = [f"acct-{i}" for i in range(1, 7)]
CHANGES = [
    # inside an hour, to the millisecond
    (
        "cohere",
        "rerank-4-pro",
        SEP + timedelta(days=13, hours=10, minutes=17, seconds=3.25),
        {
            "input_per_1m_tokens": "0.3125",
            "output_per_1m_tokens": "1.5",
            "per_1k_doc_query_pairs": "0.0007",
        },
    ),
    (
        "llmapi",
        "rerank-3",
        SEP + timedelta(days=19, seconds=30),
        {"input_per_1m_tokens": "0", "per_1k_doc_query_pairs": "0.1234567"},
    ),
]


def _post_prices(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    for provider, model, at, prices in CHANGES:
        body = {"provider": provider, "model": model, "effective_from": iso(at), **prices}
        r = client.post("/v1/prices", json=body, headers=headers)
        assert r.status_code == 201, r.text
    prices_listed: list[dict[str, Any]] = client.get("/v1/prices", headers=headers).json()["prices"]
    return prices_listed


def _run(
    client: TestClient, headers: dict[str, str], period: str, finalize: bool
) -> dict[str, Any]:
    body = {"period": period, "finalize": finalize}
    r = client.post("/v1/invoices/run", json=body, headers=headers)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _invoices(client: TestClient, headers: dict[str, str], **params: str) -> list[dict[str, Any]]:
    r = client.get("/v1/invoices", params={"limit": "1000", **params}, headers=headers)
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["invoices"]
    return found


def test_month_close_equals_brute_force_across_price_changes(
    client: TestClient, admin_headers: dict[str, str], run_cli: CliRunner
) -> None:
    prices = _post_prices(client, admin_headers)
    events = workload("sep", SEP, OCT, 1500, TENANTS, seed=3)
    post_events(client, admin_headers, events)
    want = brute_quantities(events, prices, SEP, OCT)
    assert any(k[4] and "default" not in k[4] for q in want.values() for k in q)  # new entries used

    drafts = _run(client, admin_headers, "2026-09", finalize=False)
    assert (drafts["created"], drafts["status"]) == (len(TENANTS), "draft")
    assert _run(client, admin_headers, "2026-09", finalize=False)["created"] == 0  # refresh
    for final in (True, False):
        invoices = _invoices(client, admin_headers, period="2026-09")
        assert sorted(i["tenant_id"] for i in invoices) == TENANTS  # one per tenant
        for inv in invoices:
            lines, total = brute_lines(want[inv["tenant_id"]], prices)
            assert got_lines(inv, "2026-09") == lines, inv["tenant_id"]
            assert Decimal(inv["total_usd"]) == total
            assert Decimal(inv["subtotal_usd"]) == total
            assert all(Decimal(ln["amount_usd"]).as_tuple().exponent == -2 for ln in inv["lines"])
        if final:
            result = _run(client, admin_headers, "2026-09", finalize=True)
            assert (result["finalized"], result["held"]) == (len(TENANTS), [])
    # Sequential numbers without gaps, in tenant order.
    invoices = sorted(_invoices(client, admin_headers, period="2026-09"), key=lambda i: i["number"])
    assert [i["number"] for i in invoices] == list(range(1, len(TENANTS) + 1))
    assert [i["tenant_id"] for i in invoices] == TENANTS
    assert {i["status"] for i in invoices} == {"finalized"}
    assert run_cli("invoices", "verify", "--period", "2026-09") == (0, "")

    # New events of the closed month change nothing on its invoices (they are late usage).
    post_events(client, admin_headers, workload("sep-late", SEP, OCT, 30, TENANTS[:2], seed=9))
    again = _run(client, admin_headers, "2026-09", finalize=True)
    assert (again["created"], again["refreshed"], again["finalized"]) == (0, 0, 0)
    assert _invoices(client, admin_headers, period="2026-09") == _invoices(
        client, admin_headers, period="2026-09"
    )
    after = sorted(_invoices(client, admin_headers, period="2026-09"), key=lambda i: i["number"])
    assert after == invoices
    code, out = run_cli("invoices", "verify", "--period", "2026-09")
    assert code == 1 and "not billed yet" in out  # the late events wait for the next invoice


def test_verify_finds_a_corrupted_line(
    client: TestClient, admin_headers: dict[str, str], services: Services, run_cli: CliRunner
) -> None:
    post_events(client, admin_headers, workload("v", AUG, SEP, 300, TENANTS[:3], seed=5))
    _run(client, admin_headers, "2026-08", finalize=True)
    assert run_cli("invoices", "verify", "--period", "2026-08") == (0, "")
    inv = _invoices(client, admin_headers, period="2026-08", tenant_id="acct-2")[0]
    with services.sessions.begin() as session:
        session.execute(
            update(InvoiceLineRow)
            .where(InvoiceLineRow.invoice_id == inv["id"], InvoiceLineRow.position == 0)
            .values(amount_usd=Decimal(inv["lines"][0]["amount_usd"]) + Decimal("0.01"))
        )
    code, out = run_cli("invoices", "verify", "--period", "2026-08")
    assert code == 1
    assert f"invoice {inv['id']}" in out and "line 0" in out and "amount" in out
    assert "total" in out  # the invoice no longer sums to its lines
    assert run_cli("invoices", "verify", "--period", "2026-13")[0] == 2


def test_late_usage_across_two_months_is_billed_once(
    client: TestClient, admin_headers: dict[str, str], run_cli: CliRunner
) -> None:
    prices = client.get("/v1/prices", headers=admin_headers).json()["prices"]
    aug = workload("aug", AUG, SEP, 200, ["acct-a", "acct-b"], seed=1)
    post_events(client, admin_headers, aug)
    _run(client, admin_headers, "2026-08", finalize=True)
    aug_inv = {i["tenant_id"]: i for i in _invoices(client, admin_headers, period="2026-08")}

    # Late events of August arrive, with September's own: both tenants, B without September use.
    aug_late = workload("aug-late", AUG, SEP, 40, ["acct-a", "acct-b"], seed=2)
    sep = workload("sep", SEP, OCT, 100, ["acct-a"], seed=3)
    post_events(client, admin_headers, aug_late + sep)
    _run(client, admin_headers, "2026-09", finalize=False)
    _run(client, admin_headers, "2026-09", finalize=False)  # a refresh adds nothing twice
    _run(client, admin_headers, "2026-09", finalize=True)
    sep_inv = {i["tenant_id"]: i for i in _invoices(client, admin_headers, period="2026-09")}
    assert set(sep_inv) == {"acct-a", "acct-b"}  # B's late usage gets an invoice of its own
    late_aug = brute_quantities(aug_late, prices, AUG, SEP)
    for tenant in ("acct-a", "acct-b"):
        lines, _ = brute_lines(late_aug[tenant], prices)
        assert got_lines(sep_inv[tenant], "2026-08") == lines
        assert all(ln["late"] for ln in sep_inv[tenant]["lines"] if ln["usage_period"] == "2026-08")
    own, _ = brute_lines(brute_quantities(sep, prices, SEP, OCT)["acct-a"], prices)
    assert got_lines(sep_inv["acct-a"], "2026-09") == own

    # More late events for both closed months: they go on October's invoice, once.
    later = workload("aug-later", AUG, SEP, 20, ["acct-a"], seed=4) + workload(
        "sep-later", SEP, OCT, 20, ["acct-a"], seed=5
    )
    post_events(client, admin_headers, later)
    _run(client, admin_headers, "2026-10", finalize=True)
    _run(client, admin_headers, "2026-10", finalize=True)
    (oct_inv,) = _invoices(client, admin_headers, period="2026-10")
    for start, end, month in ((AUG, SEP, "2026-08"), (SEP, OCT, "2026-09")):
        lines, _ = brute_lines(brute_quantities(later, prices, start, end)["acct-a"], prices)
        assert got_lines(oct_inv, month) == lines
    # Earlier invoices never changed; every month's raw usage is billed exactly once.
    now_aug = _invoices(client, admin_headers, period="2026-08")
    assert {i["tenant_id"]: i for i in now_aug} == aug_inv
    for month in ("2026-08", "2026-09", "2026-10"):
        assert run_cli("invoices", "verify", "--period", month) == (0, ""), month


def test_unpriced_usage_holds_the_invoice_until_a_price_covers_it(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    events = workload("u", AUG, SEP, 50, ["acct-u"], seed=8, models=("mystery-model",))
    events += workload("p", AUG, SEP, 50, ["acct-p"], seed=8)
    post_events(client, admin_headers, events)
    result = _run(client, admin_headers, "2026-08", finalize=True)
    assert result["finalized"] == 1
    assert [h["tenant_id"] for h in result["held"]] == ["acct-u"]
    assert "unpriced usage" in result["held"][0]["reason"]
    (held,) = _invoices(client, admin_headers, tenant_id="acct-u")
    assert held["status"] == "draft" and held["number"] is None
    assert all(ln["unpriced"] and ln["unit_price_usd"] is None for ln in held["lines"])
    assert held["total_usd"] == "0.00" and "mystery-model" in held["held_reason"]
    for provider in ("llmapi", "cohere", "azure", "bedrock"):
        body = {
            "provider": provider,
            "model": "mystery-model",
            "effective_from": "2026-01-01T00:00:00Z",
            "input_per_1m_tokens": "0.01",
        }
        assert client.post("/v1/prices", json=body, headers=admin_headers).status_code == 201
    again = _run(client, admin_headers, "2026-08", finalize=True)
    assert (again["finalized"], again["held"]) == (1, [])
    (final,) = _invoices(client, admin_headers, tenant_id="acct-u")
    assert final["status"] == "finalized" and final["number"] == 2
    assert not any(ln["unpriced"] for ln in final["lines"])
