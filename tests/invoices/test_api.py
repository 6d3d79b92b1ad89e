"""Invoices over the API: bad input and access, the preview against the close, runs of
the API and the CLI at once, the scheduler's job, HTML and PDF renderings."""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from fastapi.testclient import TestClient
from pypdf import PdfReader

from billing.invoices.periods import Period
from billing.invoices.render import built_dict
from metering.db.engine import session_scope
from metering.invoices import service
from metering.invoices.job import run_invoices
from metering.scheduler import JOBS
from metering.services import Services
from tests.invoices.conftest import CliRunner
from tests.invoices.helpers import post_events, workload
from tests.invoices.test_close import AUG, NOV, OCT, SEP, _invoices, _run


def _error(r: Any, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["errors"][0] == body["error"]
    text: str = body["error"]
    return text


def test_bad_input_and_access(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    post_events(client, admin_headers, workload("b", AUG, SEP, 60, ["acct-1", "acct-2"], seed=2))
    assert services.events.wait_stored(timeout=30)
    run = "/v1/invoices/run"
    for bad in ("2026-13", "26-08", "2026-8", "august", ""):
        r = client.post(run, json={"period": bad}, headers=admin_headers)
        assert _error(r, 400) == "period: must be YYYY-MM", bad
    for not_ended in ("2026-11", "2027-01"):
        r = client.post(run, json={"period": not_ended}, headers=admin_headers)
        assert _error(r, 409).startswith("period: "), not_ended
    bad_flag = {"period": "2026-08", "finalize": "x"}
    assert _error(client.post(run, json=bad_flag, headers=admin_headers), 400)
    _run(client, admin_headers, "2026-08", finalize=True)

    def get(path: str, **params: str) -> Any:
        return client.get(path, params=params, headers=admin_headers)

    def put(tenant: str, body: dict[str, str]) -> Any:
        return client.put(f"/v1/tenants/{tenant}", json=body, headers=admin_headers)

    assert "no tenant" in _error(get("/v1/invoices", tenant_id="nobody"), 404)
    assert _error(get("/v1/invoices", period="2026-8"), 400) == "period: must be YYYY-MM"
    missing = "inv_" + "0" * 24
    assert "no invoice" in _error(get(f"/v1/invoices/{missing}"), 404)
    assert "no invoice" in _error(get(f"/v1/invoices/{missing}.pdf"), 404)
    assert _error(get("/v1/invoices/not-an-id"), 404)
    assert "no tenant" in _error(get("/v1/invoices/preview", tenant_id="nobody"), 404)
    assert _error(get("/v1/invoices/preview"), 400).startswith("tenant_id:")
    assert _error(put("nobody", {"name": "X"}), 404)
    assert _error(put("acct-1", {"email": "not-mail"}), 400).startswith("email")
    assert _error(put("acct-1", {"currency": "EUR"}), 400).startswith("currency")

    # A read key bound to acct-1 sees acct-1's invoices only.
    bound = {"scopes": ["read"], "tenant_id": "acct-1"}
    r = client.post("/v1/api-keys", json=bound, headers=admin_headers)
    key = {"Authorization": f"Bearer {r.json()['key']}"}
    mine = client.get("/v1/invoices", headers=key).json()["invoices"]
    assert [i["tenant_id"] for i in mine] == ["acct-1"]
    other = _invoices(client, admin_headers, tenant_id="acct-2")[0]
    assert _error(client.get("/v1/invoices", params={"tenant_id": "acct-2"}, headers=key), 403)
    for suffix in ("", ".html", ".pdf"):
        assert _error(client.get(f"/v1/invoices/{other['id']}{suffix}", headers=key), 404)
    assert client.get(f"/v1/invoices/{mine[0]['id']}", headers=key).status_code == 200
    assert _error(client.post(run, json={"period": "2026-08"}, headers=key), 403)
    assert _error(client.put("/v1/tenants/acct-1", json={"name": "X"}, headers=key), 403)
    own = client.get("/v1/invoices/preview", params={"tenant_id": "acct-1"}, headers=key)
    assert own.json()["status"] == "preview"
    other_preview = {"tenant_id": "acct-2"}
    assert _error(client.get("/v1/invoices/preview", params=other_preview, headers=key), 403)


def test_preview_equals_the_invoice_the_close_builds(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    # September is closed; late September events and October's own until the preview.
    post_events(client, admin_headers, workload("s", SEP, OCT, 80, ["acct-a"], seed=1))
    _run(client, admin_headers, "2026-09", finalize=True)
    at = datetime(2026, 10, 20, 12, 30, 15, tzinfo=UTC)
    events = workload("late", SEP, OCT, 20, ["acct-a"], seed=2)
    events += workload("o", OCT, at, 150, ["acct-a"], seed=3)
    post_events(client, admin_headers, events)
    assert services.events.wait_stored(timeout=30)
    book = services.prices.get()
    with services.sessions() as session, services.reads.client() as ch:
        preview = service.preview(session, ch, book, "acct-a", at)
    with session_scope(services.sessions) as session, services.reads.client() as ch:
        service.run_period(session, ch, book, Period(2026, 10), finalize=True, now=NOV)
    (closed,) = _invoices(client, admin_headers, period="2026-10")
    shown = built_dict("acct-a", preview.period, preview.built, None)
    assert shown["lines"] == closed["lines"]
    assert any(ln["usage_period"] == "2026-09" for ln in closed["lines"])  # late lines too
    assert (shown["total_usd"], shown["period"]) == (closed["total_usd"], "2026-10")
    assert preview.projected_total > Decimal(closed["total_usd"])  # 11 more days of traffic
    # Over HTTP (this month, now): the shape, with the projection.
    r = client.get("/v1/invoices/preview", params={"tenant_id": "acct-a"}, headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "preview"
    assert Decimal(body["projected_total_usd"]) >= Decimal(body["total_usd"])


def test_api_and_cli_running_the_month_at_once_create_no_duplicate(
    client: TestClient, admin_headers: dict[str, str], run_cli: CliRunner, services: Services
) -> None:
    tenants = [f"acct-{i}" for i in range(8)]
    post_events(client, admin_headers, workload("c", AUG, SEP, 400, tenants, seed=4))
    # The CLI is another process in production: it reads what is stored, so store first.
    assert services.events.wait_stored(timeout=30)
    results: dict[str, Any] = {}

    def api() -> None:
        results["api"] = _run(client, admin_headers, "2026-08", finalize=True)

    def cli() -> None:
        results["cli"] = run_cli("invoices", "run", "--period", "2026-08", "--finalize")

    threads = [threading.Thread(target=api), threading.Thread(target=cli)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results["cli"][0] == 0 and "api" in results
    invoices = _invoices(client, admin_headers, period="2026-08")
    assert sorted(i["tenant_id"] for i in invoices) == tenants
    assert sorted(i["number"] for i in invoices) == list(range(1, len(tenants) + 1))
    # Whichever ran second found the work done.
    by_cli = json.loads(results["cli"][1])["finalized"]
    assert sorted([results["api"]["finalized"], by_cli]) == [0, len(tenants)]


def test_the_job_drafts_when_the_month_ends_and_finalizes_after_the_grace_days(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    assert "invoices" in JOBS
    post_events(client, admin_headers, workload("j", OCT, NOV, 50, ["acct-j"], seed=6))
    assert services.events.wait_stored(timeout=30)
    done = run_invoices(services, now=lambda: datetime(2026, 11, 1, 0, 30, tzinfo=UTC))
    assert [(d["period"], d["finalize"]) for d in done] == [("2026-09", True), ("2026-10", False)]
    assert [i["status"] for i in _invoices(client, admin_headers, period="2026-10")] == ["draft"]
    assert run_invoices(services, now=lambda: datetime(2026, 11, 1, 23, tzinfo=UTC)) == []
    done = run_invoices(services, now=lambda: datetime(2026, 11, 2, 0, 5, tzinfo=UTC))
    assert [(d["period"], d["finalized"]) for d in done] == [("2026-10", 1)]
    statuses = [i["status"] for i in _invoices(client, admin_headers, period="2026-10")]
    assert statuses == ["finalized"]
    assert run_invoices(services, now=lambda: datetime(2026, 11, 2, 1, tzinfo=UTC)) == []


def test_pdf_and_html_show_tenant_period_lines_and_total(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    post_events(client, admin_headers, workload("r", AUG, SEP, 40, ["acct-r"], seed=7))
    assert services.events.wait_stored(timeout=30)  # the tenant is registered as it is stored
    details = {"name": "Acme Rerank GmbH", "email": "billing@acme.test", "address": "1 Main St"}
    r = client.put("/v1/tenants/acct-r", json=details, headers=admin_headers)
    assert r.status_code == 200 and r.json()["name"] == details["name"]
    _run(client, admin_headers, "2026-08", finalize=True)
    (inv,) = _invoices(client, admin_headers, period="2026-08")
    assert inv["billing"] == details
    html = client.get(f"/v1/invoices/{inv['id']}.html", headers=admin_headers)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    pdf = client.get(f"/v1/invoices/{inv['id']}.pdf", headers=admin_headers)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
    total = f"Total: {inv['total_usd']} USD"
    for shown in (html.text, text):
        flat = "".join(shown.split())  # a long name may wrap in a PDF table cell

        def has(needle: str, flat: str = flat) -> bool:
            return "".join(needle.split()) in flat

        for needle in ("acct-r", "2026-08", details["name"], total, "Invoice 000001"):
            assert has(needle), needle
        for ln in inv["lines"]:
            assert has(ln["amount_usd"]) and has(str(ln["quantity"])) and has(ln["model"])
    # Later details do not rewrite the issued invoice.
    client.put("/v1/tenants/acct-r", json={"name": "Other"}, headers=admin_headers)
    assert _invoices(client, admin_headers, period="2026-08")[0]["billing"] == details
