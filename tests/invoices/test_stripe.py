"""Stripe: each invoice item exactly once although the local Stripe server fails half of
the requests and times out after applying some; amounts, currency and idempotency keys
checked by that server; the webhook marks invoices paid or void, refuses bad signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from billing.invoices.models import InvoiceLineRow, InvoiceRow
from billing.invoices.stripe_sync import StripeGateway, sync_pending
from metering.services import Services
from tests.invoices.fake_stripe import API_KEY, FakeStripe
from tests.invoices.helpers import post_events, workload
from tests.invoices.test_close import AUG, SEP, _invoices, _run

SECRET = "whsec_test_secret"


def _gateway(fake: FakeStripe) -> StripeGateway:
    return StripeGateway(API_KEY, api_base=fake.url, timeout=0.4, attempts=10, backoff=0.01)


def _close_august(client: TestClient, headers: dict[str, str], services: Services) -> None:
    tenants = ["acct-s1", "acct-s2", "acct-s3"]
    post_events(client, headers, workload("st", AUG, SEP, 300, tenants, seed=11))
    services.settings.stripe_api_key = API_KEY  # finalized invoices are marked for Stripe
    _run(client, headers, "2026-08", finalize=True)


def test_stripe_gets_each_item_once_despite_failures_and_timeouts(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    _close_august(client, admin_headers, services)
    ours = {i["id"]: i for i in _invoices(client, admin_headers, period="2026-08")}
    with FakeStripe(hang=1.0) as fake:
        assert sync_pending(services.sessions, _gateway(fake)) == {"sent": 3, "failed": 0}
        assert fake.failures > 0 and fake.timeouts > 0  # it did fail, on purpose
        # A sync that died after Stripe applied an item but before the id was stored:
        # the retry carries the same key and gets the first answer, no second item.
        inv_id = next(iter(ours))
        with services.sessions.begin() as session:
            session.execute(
                update(InvoiceLineRow)
                .where(InvoiceLineRow.invoice_id == inv_id)
                .values(stripe_item_id=None)
            )
            session.execute(
                update(InvoiceRow).where(InvoiceRow.id == inv_id).values(stripe_status="pending")
            )
        items_before = len(fake.items)
        assert sync_pending(services.sessions, _gateway(fake)) == {"sent": 1, "failed": 0}
        assert len(fake.items) == items_before
        assert sync_pending(services.sessions, _gateway(fake)) == {"sent": 0, "failed": 0}

        by_invoice: dict[str, list[dict[str, Any]]] = {}
        for item in fake.items.values():
            by_invoice.setdefault(item["invoice"], []).append(item)
        stored = {i["id"]: i for i in _invoices(client, admin_headers, period="2026-08")}
        assert len(fake.customers) == 3 and len(fake.invoices) == 3
        for inv in stored.values():
            stripe_inv = fake.invoices[inv["stripe_invoice_id"]]
            assert stripe_inv["metadata"]["invoice_id"] == inv["id"]
            assert stripe_inv["status"] == "open" and stripe_inv["currency"] == "usd"
            items = by_invoice[inv["stripe_invoice_id"]]
            positions = Counter(item["metadata"]["line"] for item in items)
            nonzero = [ln for ln in inv["lines"] if Decimal(ln["amount_usd"])]
            assert len(items) == len(nonzero) and set(positions.values()) == {1}  # once each
            assert stripe_inv["total"] == int(Decimal(inv["total_usd"]) * 100)
            for item in items:
                line = inv["lines"][int(item["metadata"]["line"])]
                assert item["amount"] == int(Decimal(line["amount_usd"]) * 100)


def test_the_same_key_with_other_parameters_is_refused_and_recorded(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    _close_august(client, admin_headers, services)
    (first, *_) = _invoices(client, admin_headers, period="2026-08")
    with FakeStripe(fail=False) as fake:
        # Someone else used our invoice's key with other parameters first.
        taken = ("other", 200, {"id": "in_other", "object": "invoice"})
        fake.keys[f"invoice-{first['id']}"] = taken
        done = sync_pending(services.sessions, _gateway(fake))
    assert done == {"sent": 2, "failed": 1}
    with services.sessions() as session:
        row = session.get(InvoiceRow, first["id"])
        assert row is not None and row.stripe_status == "pending"
        assert row.stripe_error is not None and "idempotency" in row.stripe_error


def _signed(payload: bytes, at: int, secret: str = SECRET) -> dict[str, str]:
    mac = hmac.new(secret.encode(), f"{at}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={at},v1={mac}", "Content-Type": "application/json"}


@pytest.mark.parametrize("kind,status", [("invoice.paid", "paid"), ("invoice.voided", "void")])
def test_webhook_with_a_valid_signature_marks_the_invoice(
    client: TestClient, admin_headers: dict[str, str], services: Services, kind: str, status: str
) -> None:
    _close_august(client, admin_headers, services)
    services.settings.stripe_webhook_secret = SECRET
    with FakeStripe(fail=False) as fake:
        sync_pending(services.sessions, _gateway(fake))
    inv = _invoices(client, admin_headers, period="2026-08")[0]
    event = {
        "id": "evt_1",
        "object": "event",
        "type": kind,
        "data": {"object": {"id": inv["stripe_invoice_id"], "object": "invoice", "metadata": {}}},
    }
    payload = json.dumps(event).encode()
    url = "/v1/stripe/webhook"
    now = int(time.time())
    for headers in (
        _signed(payload, now, "whsec_wrong"),
        _signed(payload, now - 301),  # stale: a replay
        {"Stripe-Signature": "t=1,v1=00"},
        {},
    ):
        r = client.post(url, content=payload, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("stripe-signature: ")
    tampered = payload.replace(b"evt_1", b"evt_2")
    assert client.post(url, content=tampered, headers=_signed(payload, now)).status_code == 400
    assert _invoices(client, admin_headers, period="2026-08")[0]["status"] == "finalized"
    r = client.post(url, content=payload, headers=_signed(payload, now))
    assert r.status_code == 200, r.text
    assert r.json()["invoice_id"] == inv["id"]
    after = [i for i in _invoices(client, admin_headers, period="2026-08") if i["id"] == inv["id"]]
    assert after[0]["status"] == status
