"""Budgets end to end: CRUD, bad input, authorize (read-your-writes, hard limits),
thresholds fired once under concurrent ingest, restarts, rollover and edits with a
controllable clock, the overshoot bound, price changes and reconciliation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from billing.alerts.messages import verify_signature
from metering.app import create_app, wait_ready
from metering.services import Services
from metering.settings import Settings
from tests.budgets.conftest import Receiver
from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# cohere rerank-4-pro: $0.25 per 1M input tokens (default price book): $1 per event.
DOLLAR = {"provider": "cohere", "model": "rerank-4-pro", "input_tokens": 4_000_000}


def _post(client: TestClient, events: list[dict[str, Any]]) -> None:
    r = client.post("/v1/events", json={"events": events}, headers=H)
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == len(events)


def _budget(client: TestClient, **body: Any) -> dict[str, Any]:
    body.setdefault("tenant_id", "acct-1")
    body.setdefault("amount_usd", "10")
    r = client.post("/v1/budgets", json=body, headers=H)
    assert r.status_code == 201, r.text
    return r.json()


def _authorize(client: TestClient, tenant: str = "acct-1", project: str = "proj-1") -> Any:
    r = client.post("/v1/authorize", json={"tenant_id": tenant, "project_id": project}, headers=H)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_create_show_list_edit_end(client: TestClient) -> None:
    b = _budget(client, project_id="proj-1", amount_usd="100.50", hard_limit=True)
    assert b["id"].startswith("bud_")
    assert b["amount_usd"] == "100.5"
    assert b["thresholds"] == [0.5, 0.8, 1.0]
    assert (b["spend_usd"], b["remaining_usd"], b["forecast_usd"]) == ("0", "100.5", "0")
    assert b["alerts"] == []
    listed = client.get("/v1/budgets?tenant_id=acct-1", headers=H).json()["budgets"]
    assert [x["id"] for x in listed] == [b["id"]]
    assert client.get("/v1/budgets?tenant_id=acct-2", headers=H).json()["budgets"] == []
    r = client.patch(f"/v1/budgets/{b['id']}", json={"amount_usd": "200"}, headers=H)
    assert r.status_code == 200 and r.json()["amount_usd"] == "200"
    assert client.delete(f"/v1/budgets/{b['id']}", headers=H).status_code == 204
    assert client.get(f"/v1/budgets/{b['id']}", headers=H).status_code == 404
    assert client.get("/v1/budgets", headers=H).json()["budgets"] == []


def test_a_read_key_sees_its_own_tenant_only(client: TestClient) -> None:
    mine = _budget(client, tenant_id="acct-1")
    other = _budget(client, tenant_id="acct-2")
    key = client.post(
        "/v1/api-keys", json={"scopes": ["read"], "tenant_id": "acct-1"}, headers=H
    ).json()["key"]
    kh = {"Authorization": f"Bearer {key}"}
    assert [b["id"] for b in client.get("/v1/budgets", headers=kh).json()["budgets"]] == [
        mine["id"]
    ]
    assert client.get("/v1/budgets?tenant_id=acct-2", headers=kh).status_code == 403
    assert client.get(f"/v1/budgets/{other['id']}", headers=kh).status_code == 404
    assert client.get(f"/v1/budgets/{mine['id']}", headers=kh).status_code == 200
    # a read key may neither create nor authorize
    assert client.post("/v1/budgets", json={"amount_usd": "1"}, headers=kh).status_code == 403
    r = client.post("/v1/authorize", json={"tenant_id": "acct-1"}, headers=kh)
    assert r.status_code == 403


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"amount_usd": "-5"}, "amount_usd: must be greater than 0"),
        ({"amount_usd": "0"}, "amount_usd: must be greater than 0"),
        ({"amount_usd": "ten"}, "amount_usd: must be a decimal string"),
        ({"amount_usd": 10}, "amount_usd:"),
        ({"thresholds": [0, 0.5]}, "thresholds[0]:"),
        ({"thresholds": [1.5]}, "thresholds[0]:"),
        ({"thresholds": [0.5, 0.5]}, "thresholds: must not repeat a value"),
        ({"period": "weekly"}, "period:"),
        ({"channels": [{"type": "pager", "url": "https://x.example"}]}, "channels[0].type:"),
        ({"channels": [{"type": "webhook", "url": "not a url", "secret": "s"}]}, "channels[0].url"),
        ({"channels": [{"type": "email", "to": "nobody"}]}, "channels[0].to"),
        ({"tenant_id": "bad tenant!"}, "tenant_id:"),
        ({"surprise": 1}, "surprise:"),
    ],
)
def test_bad_input_is_400_naming_field_and_rule(
    client: TestClient, body: dict[str, Any], error: str
) -> None:
    full = {"tenant_id": "acct-1", "amount_usd": "10", **body}
    r = client.post("/v1/budgets", json=full, headers=H)
    assert r.status_code == 400, r.text
    assert any(e.startswith(error) for e in r.json()["errors"]), r.json()


def test_private_webhook_urls_are_refused_by_default(settings: Settings) -> None:
    settings.webhook_allow_private = False
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as client:
        wait_ready(app)
        for url in ("http://127.0.0.1:9/x", "http://10.0.0.8/x", "http://[::1]/x"):
            channel = {"type": "webhook", "url": url, "secret": "s"}
            body = {"tenant_id": "acct-1", "amount_usd": "10", "channels": [channel]}
            r = client.post("/v1/budgets", json=body, headers=H)
            assert r.status_code == 400, url
            assert "METERING_WEBHOOK_ALLOW_PRIVATE" in r.json()["error"]


def test_authorize_reflects_every_acknowledged_event(client: TestClient) -> None:
    tenant_wide = _budget(client, amount_usd="3", hard_limit=True)
    project = _budget(client, project_id="proj-2", amount_usd="1", hard_limit=True)
    soft = _budget(client, project_id="proj-1", amount_usd="1", hard_limit=False)
    got = _authorize(client)
    assert got["allowed"] is True and got["reason"] is None
    assert {b["id"] for b in got["budgets"]} == {tenant_wide["id"], soft["id"]}
    for i in range(3):
        _post(client, [event(f"a{i}", **DOLLAR)])
        got = _authorize(client)  # right after the 202: no wait
        spend = {b["id"]: b["spend_usd"] for b in got["budgets"]}
        assert spend == {tenant_wide["id"]: str(i + 1), soft["id"]: str(i + 1)}
        assert got["allowed"] is (i + 1 < 3), got
    assert "hard limit" in got["reason"] and tenant_wide["id"] in got["reason"]
    # error events and other tenants cost nothing
    _post(
        client, [event("err", status="error", **DOLLAR), event("b", tenant_id="acct-9", **DOLLAR)]
    )
    other = _authorize(client, project="proj-2")
    assert {b["id"]: b["spend_usd"] for b in other["budgets"]} == {
        tenant_wide["id"]: "3",
        project["id"]: "0",
    }
    shown = client.get(f"/v1/budgets/{tenant_wide['id']}", headers=H).json()
    assert (shown["spend_usd"], shown["remaining_usd"]) == ("3", "0")


def test_a_new_budget_counts_the_month_so_far_exactly(client: TestClient) -> None:
    odd = {"provider": "llmapi", "model": "rerank-4-pro", "input_tokens": 1_234_567}
    _post(client, [event(i, **odd) for i in range(7)])
    _post(client, [event("pairs", provider="azure", model="rerank-3", documents=33, queries=3)])
    last_month = datetime.now(UTC).replace(day=1) - timedelta(days=2)
    _post(client, [event("old", timestamp=last_month.isoformat(), **DOLLAR)])
    b = _budget(client, amount_usd="100")
    # 7 x 1,234,567 tokens x $0.05/1M + 99 pairs x $0.16/1K; last month's event not counted
    expected = (
        Decimal(7 * 1_234_567) * Decimal("0.05") / 10**6 + Decimal(99) * Decimal("0.16") / 1000
    )
    assert Decimal(b["spend_usd"]) == expected
    assert b["spend_usd"] == format(expected.normalize(), "f")


def test_thresholds_fire_once_each_with_8_clients_ingesting(
    client: TestClient, receiver: Receiver
) -> None:
    channel = {"type": "webhook", "url": receiver.url, "secret": "s3cret"}
    b = _budget(client, amount_usd="40", channels=[channel])
    errors: list[BaseException] = []

    def sender(n: int) -> None:
        try:
            for i in range(8):
                _post(client, [event(f"c{n}-{i}", **DOLLAR)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    _wait(lambda: len(receiver.payloads()) >= 3)
    time.sleep(1.5)  # a second firing would have arrived by now
    payloads = receiver.payloads()
    assert sorted(p["threshold"] for p in payloads) == [0.5, 0.8, 1.0]
    for (headers, body), p in zip(receiver.requests, payloads, strict=True):
        assert verify_signature("s3cret", body, headers["X-Metering-Signature"])
        assert p["type"] == "budget.threshold_crossed"
        assert p["budget_id"] == b["id"] and p["amount_usd"] == "40"
        assert Decimal(p["spend_usd"]) >= Decimal(str(p["threshold"])) * 40
    shown = client.get(f"/v1/budgets/{b['id']}", headers=H).json()
    assert shown["spend_usd"] == "64"
    assert [a["threshold"] for a in shown["alerts"]] == [0.5, 0.8, 1.0]
    assert all(a["deliveries"][0]["status"] == "delivered" for a in shown["alerts"])


def test_a_restart_rebuilds_spend_and_fires_nothing_again(
    settings: Settings, receiver: Receiver
) -> None:
    channel = {"type": "webhook", "url": receiver.url, "secret": "s"}
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as client:
        wait_ready(app)
        b = _budget(client, amount_usd="4", hard_limit=True, channels=[channel])
        _post(client, [event(i, **DOLLAR) for i in range(5)])
        _wait(lambda: len(receiver.payloads()) == 3)
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    with TestClient(app) as client:
        wait_ready(app)
        got = _authorize(client)
        assert got["allowed"] is False
        assert got["budgets"][0]["spend_usd"] == "5"
        _post(client, [event("after", **DOLLAR)])
        assert _authorize(client)["budgets"][0]["spend_usd"] == "6"
        services: Services = app.state.services
        services.budgets.check_now()
        assert client.get(f"/v1/budgets/{b['id']}", headers=H).json()["spend_usd"] == "6"
    time.sleep(1.0)
    assert len(receiver.payloads()) == 3


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _set_clock(services: Services, clock: Clock) -> None:
    runtime = services.budgets
    runtime.now = runtime.ledger.now = runtime.deliverer.now = clock


def test_month_rollover_and_edits_with_a_controllable_clock(
    client: TestClient, services: Services, receiver: Receiver
) -> None:
    real = datetime.now(UTC)
    previous = (real.replace(day=1) - timedelta(days=1)).replace(day=20, hour=12)
    clock = Clock(previous)
    _set_clock(services, clock)
    services.budgets.reconcile()  # the ledger now counts the previous month as current
    channel = {"type": "webhook", "url": receiver.url, "secret": "s"}
    b = _budget(client, amount_usd="10", channels=[channel])
    stamp = (previous - timedelta(hours=1)).isoformat()
    _post(client, [event(f"p{i}", timestamp=stamp, **DOLLAR) for i in range(6)])
    services.budgets.check_now()
    _wait(lambda: len(receiver.payloads()) == 1)
    assert receiver.payloads()[0]["period"] == previous.strftime("%Y-%m")
    # Edit mid-period: spend is kept; raising the amount re-arms 0.5 (6 < 0.5 x 20)
    r = client.patch(f"/v1/budgets/{b['id']}", json={"amount_usd": "20"}, headers=H)
    assert r.json()["spend_usd"] == "6"
    _post(client, [event(f"q{i}", timestamp=stamp, **DOLLAR) for i in range(5)])
    services.budgets.check_now()
    _wait(lambda: len(receiver.payloads()) == 2)
    assert (
        receiver.payloads()[1]["threshold"] == 0.5 and receiver.payloads()[1]["spend_usd"] == "11"
    )
    # Lowering it fires what is now crossed, at once, once: 11 >= 0.8 x 12
    client.patch(f"/v1/budgets/{b['id']}", json={"amount_usd": "12"}, headers=H)
    _wait(lambda: len(receiver.payloads()) == 3)
    assert receiver.payloads()[2]["threshold"] == 0.8
    forecast_before = Decimal(
        client.get(f"/v1/budgets/{b['id']}", headers=H).json()["forecast_usd"]
    )
    assert forecast_before >= 11
    # Rollover: the real month starts; spend starts at zero, thresholds re-arm.
    clock.now = real
    services.budgets.check_now()
    shown = client.get(f"/v1/budgets/{b['id']}", headers=H).json()
    assert (shown["spend_usd"], shown["current_period"]) == ("0", real.strftime("%Y-%m"))
    _post(client, [event(f"n{i}", **DOLLAR) for i in range(7)])
    services.budgets.check_now()
    _wait(lambda: len(receiver.payloads()) == 4)  # 7 >= 0.5 x 12; 0.8 x 12 not reached
    fresh = receiver.payloads()[3]
    assert (fresh["threshold"], fresh["spend_usd"]) == (0.5, "7")
    assert fresh["period"] == real.strftime("%Y-%m")
    time.sleep(1.0)
    assert len(receiver.payloads()) == 4


def test_concurrent_overshoot_stays_within_the_stated_bound(client: TestClient) -> None:
    """README: with N callers each doing authorize -> one request -> its event, a hard
    limit is overshot by at most N - 1 requests' cost (each caller has at most one request
    in flight when the limit is reached, and the one that crosses it was allowed)."""
    b = _budget(client, amount_usd="20", hard_limit=True)
    callers = 6
    stop = threading.Event()

    def caller(n: int) -> None:
        i = 0
        while not stop.is_set():
            if not _authorize(client)["allowed"]:
                return
            _post(client, [event(f"o{n}-{i}", **DOLLAR)])
            i += 1

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    spend = Decimal(client.get(f"/v1/budgets/{b['id']}", headers=H).json()["spend_usd"])
    assert Decimal(20) <= spend <= Decimal(20) + (callers - 1)
    assert _authorize(client)["allowed"] is False


def test_a_price_posted_into_the_past_reaches_budget_spend(
    client: TestClient, services: Services
) -> None:
    b = _budget(client, amount_usd="100")
    _post(client, [event(i, **DOLLAR) for i in range(2)])
    assert _authorize(client)["budgets"][0]["spend_usd"] == "2"
    price = {
        "provider": "cohere",
        "model": "rerank-4-pro",
        "effective_from": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "input_per_1m_tokens": "0.5",
    }
    assert client.post("/v1/prices", json=price, headers=H).status_code == 201
    services.budgets.check_now()  # the worker polls the book every 2 s; now at once
    services.budgets._book_checked = 0
    services.budgets.check_now()
    assert client.get(f"/v1/budgets/{b['id']}", headers=H).json()["spend_usd"] == "4"


def test_reconcile_finds_and_corrects_drift(client: TestClient, services: Services) -> None:
    _budget(client, amount_usd="100")
    _post(client, [event(i, **DOLLAR) for i in range(3)])
    assert services.budgets.reconcile()["drifted"] == 0
    # Corrupt the in-memory ledger behind its back: the next reconciliation repairs it.
    ledger = services.budgets.ledger
    period = datetime.now(UTC).strftime("%Y-%m")
    with ledger._lock:
        for q in ledger._usage[(("acct-1", None), period)].values():
            q[0] += 4_000_000
        ledger._spend.clear()
    assert _authorize(client)["budgets"][0]["spend_usd"] == "4"
    report = services.budgets.reconcile()
    assert report["drifted"] == 1 and report["drift_usd"] == "1"
    assert _authorize(client)["budgets"][0]["spend_usd"] == "3"
    metrics = client.get("/metrics").text
    assert "metering_budget_spend_drift_usd 1.0" in metrics


def test_the_forecast_alert_fires_once_when_the_month_end_projection_exceeds_the_amount(
    client: TestClient, services: Services, receiver: Receiver
) -> None:
    real = datetime.now(UTC)
    month = (real.replace(day=1) - timedelta(days=1)).replace(day=1, hour=12, minute=0)
    clock = Clock(month.replace(day=9))
    _set_clock(services, clock)
    services.budgets.reconcile()
    channel = {"type": "webhook", "url": receiver.url, "secret": "s"}
    b = _budget(client, amount_usd="20", channels=[channel], thresholds=[1.0])
    # $1 a day at noon for 8 days: $8 so far, about $1 a day expected for the rest.
    _post(
        client,
        [event(f"d{d}", timestamp=month.replace(day=d).isoformat(), **DOLLAR) for d in range(1, 9)],
    )
    clock.now += timedelta(minutes=61)  # profiles are recomputed hourly
    shown = client.get(f"/v1/budgets/{b['id']}", headers=H).json()
    assert shown["spend_usd"] == "8"
    assert Decimal(shown["forecast_usd"]) > 20
    assert services.budgets.reconcile()["forecast_alerts"] == 1
    _wait(lambda: len(receiver.payloads()) == 1)
    alert = receiver.payloads()[0]
    assert alert["type"] == "budget.forecast_exceeded"
    assert alert["spend_usd"] == "8" and Decimal(alert["forecast_usd"]) > 20
    assert services.budgets.reconcile()["forecast_alerts"] == 0
    time.sleep(1.0)
    assert len(receiver.payloads()) == 1


def test_authorize_checks_the_caller_and_the_body(client: TestClient) -> None:
    url = "/v1/authorize"
    assert client.post(url, json={"tenant_id": "a"}).status_code == 401
    bad = client.post(url, json={"tenant_id": "a"}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    ingest = client.post("/v1/api-keys", json={"scopes": ["ingest"]}, headers=H).json()["key"]
    ok = client.post(
        url, json={"tenant_id": "a", "x": 1}, headers={"Authorization": f"Bearer {ingest}"}
    )
    assert ok.status_code == 200 and ok.json() == {"allowed": True, "reason": None, "budgets": []}
    for body, error in (
        (b"{", "body: not valid JSON"),
        (b"[]", "body: Expected `object`, got `array`"),
        (b"{}", "tenant_id: field required"),
        (b'{"tenant_id": 5}', "tenant_id: Expected `str`, got `int`"),
        (b'{"tenant_id": "a b"}', "tenant_id: must be 1-64 characters of [A-Za-z0-9_.:-]"),
        (b'{"tenant_id": "a", "project_id": ""}', "project_id: must be 1-64 characters"),
        (b'{"tenant_id": "' + b"a" * 65 + b'"}', "tenant_id: must be 1-64 characters"),
    ):
        r = client.post(url, content=body, headers=H)
        assert r.status_code == 400, body
        assert r.json()["error"].startswith(error), (body, r.json())
    schema = client.get("/openapi.json").json()["paths"][url]["post"]
    assert schema["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "tenant_id"
    ]
