"""The outbox against a real database (SQLite, or PostgreSQL with METERING_TEST_DATABASE_URL)
and a real HTTP receiver on 127.0.0.1: signed webhooks, retries, restarts, two workers."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from billing.alerts import channels as channel_rules
from billing.alerts import outbox
from billing.alerts.outbox import Deliverer, verify_signature
from billing.budgets.models import AlertDeliveryRow, BudgetAlertRow
from tests.alerts.conftest import (
    SECRET,
    Clock,
    Receiver,
    fire,
    payload_of,
    rows,
    wait_until,
)

DECILES = ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1")


def make_deliverer(sessions: sessionmaker[Session], **overrides: Any) -> Deliverer:
    options: dict[str, Any] = {
        "sessions": sessions,
        "smtp_url": None,
        "smtp_from": None,
        "allow_private": True,
        "base_delay": 0.2,
        "max_delay": 1.0,
        "lease_seconds": 30.0,
        "timeout": 5.0,
    }
    options.update(overrides)
    return Deliverer(**options)


def webhook(receiver: Receiver) -> dict[str, Any]:
    return {"type": "webhook", "url": receiver.url, "secret": SECRET}


def per_delivery(received: list[Any]) -> Counter[str]:
    return Counter(r.headers["X-Metering-Delivery"] for r in received)


def test_enqueue_writes_one_delivery_per_channel_with_the_bytes_to_send(
    sessions: sessionmaker[Session],
) -> None:
    channels = [
        {"type": "webhook", "url": "https://hooks.example.com/x", "secret": SECRET},
        {"type": "slack", "url": "https://hooks.slack.com/services/T/B/X"},
        {"type": "email", "to": "ops@example.com"},
    ]
    [(alert, created)] = fire(sessions, channels)
    stored = sorted(rows(sessions).values(), key=lambda r: r.channel_index)
    assert [r.id for r in stored] == [r.id for r in created]
    assert [r.channel_index for r in stored] == [0, 1, 2]
    assert [r.channel for r in stored] == channels
    assert all(r.id.startswith("dlv_") and len(r.id) == 28 for r in stored)
    assert {(r.status, r.attempts, r.alert_id) for r in stored} == {("pending", 0, alert.id)}
    payload = payload_of(alert)
    assert stored[0].body == json.dumps(payload, separators=(",", ":"))
    assert json.loads(stored[0].body)["threshold"] == 0.8
    assert json.loads(stored[0].body)["spend_usd"] == "80.5"
    assert json.loads(stored[1].body) == {
        "text": f"Budget {alert.budget_id} (tenant acme / project search): "
        "80% threshold crossed, spend $80.50 of $100.00 for 2026-11."
    }
    email = json.loads(stored[2].body)
    assert email["subject"] == "Budget 80% threshold crossed: tenant acme / project search, 2026-11"
    assert "Spend:     $80.50" in email["text"]


def test_a_second_writer_of_the_same_firing_leaves_no_deliveries(
    sessions: sessionmaker[Session],
) -> None:
    channels = [{"type": "email", "to": "ops@example.com"}]
    [(alert, _)] = fire(sessions, channels)
    twin = BudgetAlertRow(
        id="alr_twin",
        budget_id=alert.budget_id,
        tenant_id=alert.tenant_id,
        project_id=alert.project_id,
        period=alert.period,
        kind=alert.kind,
        threshold=alert.threshold,
        arm=alert.arm,
        spend_usd=alert.spend_usd,
        amount_usd=alert.amount_usd,
        at=alert.at,
    )
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(twin)
        outbox.enqueue(session, twin, channels, payload_of(twin))
    assert len(rows(sessions)) == 1


def test_webhook_is_signed_over_the_raw_body_and_names_delivery_and_event(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    results: list[tuple[str, str]] = []
    [(alert, [row])] = fire(sessions, [webhook(receiver)])
    deliverer = make_deliverer(sessions, on_result=lambda *r: results.append(r))
    assert deliverer.run_due() == 1
    [got] = receiver.all()
    expected = "sha256=" + hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers["X-Metering-Signature"] == expected
    assert verify_signature(SECRET, got.body, got.headers["X-Metering-Signature"])
    assert not verify_signature("other", got.body, got.headers["X-Metering-Signature"])
    assert not verify_signature(SECRET, got.body + b" ", got.headers["X-Metering-Signature"])
    assert got.headers["X-Metering-Delivery"] == row.id
    assert got.headers["X-Metering-Event"] == "budget.threshold_crossed"
    assert got.headers["Content-Type"] == "application/json"
    assert json.loads(got.body) == payload_of(alert)
    stored = rows(sessions)[row.id]
    assert (stored.status, stored.attempts, stored.last_error) == ("delivered", 1, None)
    assert stored.delivered_at is not None and stored.lease_until is None
    assert results == [("webhook", "delivered")]
    assert deliverer.run_due() == 0


def _recovering_receiver_gets_each_alert_once(
    sessions: sessionmaker[Session], receiver: Receiver, down_for: float, **options: Any
) -> None:
    recovers_at = time.monotonic() + down_for
    receiver.answer = lambda: 200 if time.monotonic() >= recovers_at else 500
    fired = fire(sessions, [webhook(receiver)], thresholds=("0.5", "0.8", "1"))
    ids = {row.id for _, [row] in fired}
    deliverer = make_deliverer(sessions, **options)
    deliverer.start()
    try:
        deliverer.wake()
        wait_until(
            lambda: {r.status for r in rows(sessions).values()} == {"delivered"},
            down_for * 4 + 30,
            "every delivery delivered",
        )
    finally:
        assert deliverer.stop(10)
    assert per_delivery(receiver.delivered()) == Counter(dict.fromkeys(ids, 1))
    failed = [r for r in receiver.all() if r.status == 500]
    assert failed, "the receiver never failed: the retry path did not run"
    bodies = {r.headers["X-Metering-Delivery"]: r.body for r in receiver.delivered()}
    for attempt in failed:  # every attempt sends the same bytes, signed the same way
        assert attempt.body == bodies[attempt.headers["X-Metering-Delivery"]]
        assert verify_signature(SECRET, attempt.body, attempt.headers["X-Metering-Signature"])
    assert deliverer.run_due() == 0
    assert per_delivery(receiver.delivered()) == Counter(dict.fromkeys(ids, 1))


def test_receiver_down_3s_gets_each_alert_exactly_once_after_it_recovers(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    _recovering_receiver_gets_each_alert_once(
        sessions, receiver, 3.0, base_delay=0.2, max_delay=1.0
    )


@pytest.mark.slow
def test_receiver_down_30s_gets_each_alert_exactly_once_after_it_recovers(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    _recovering_receiver_gets_each_alert_once(
        sessions, receiver, 30.0, base_delay=1.0, max_delay=8.0
    )


def test_restart_mid_way_sends_nothing_twice(
    sessions: sessionmaker[Session],
    second_sessions: sessionmaker[Session],
    receiver: Receiver,
) -> None:
    receiver.delay = 0.2
    fired = fire(sessions, [webhook(receiver)], thresholds=DECILES[:8])
    ids = {row.id for _, [row] in fired}
    first = make_deliverer(sessions)
    first.start()
    first.wake()
    wait_until(lambda: len(receiver.delivered()) >= 2, 30, "two deliveries")
    assert first.stop(10)
    sent_before = per_delivery(receiver.delivered())
    pending = [r for r in rows(sessions).values() if r.status == "pending"]
    assert len(pending) >= 2, "the first worker finished before it was stopped"
    # A replica killed right after its claim: the row stays "sending" under a lease.
    clock = Clock()
    killed = pending[0].id
    with sessions.begin() as session:
        session.execute(
            update(AlertDeliveryRow)
            .where(AlertDeliveryRow.id == killed)
            .values(status="sending", lease_until=clock() + timedelta(seconds=30))
        )
    second = make_deliverer(second_sessions, now=clock)
    assert second.run_due() == len(pending) - 1
    assert killed not in per_delivery(receiver.delivered())
    clock.advance(29)
    assert second.run_due() == 0
    clock.advance(2)
    assert second.run_due() == 1
    assert second.run_due() == 0
    counts = per_delivery(receiver.delivered())
    assert counts == Counter(dict.fromkeys(ids, 1))
    assert all(counts[i] == 1 for i in sent_before)
    assert {r.status for r in rows(sessions).values()} == {"delivered"}


def test_two_deliverers_at_once_send_each_row_once(
    sessions: sessionmaker[Session],
    second_sessions: sessionmaker[Session],
    receiver: Receiver,
) -> None:
    ids: set[str] = set()
    for _ in range(3):
        ids |= {row.id for _, [row] in fire(sessions, [webhook(receiver)], thresholds=DECILES)}
    receiver.delay = 0.005
    workers = [make_deliverer(sessions), make_deliverer(second_sessions)]
    start = threading.Barrier(2, timeout=10)
    attempted = [0, 0]

    def work(index: int) -> None:
        start.wait()
        attempted[index] = workers[index].run_due()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert sum(attempted) == len(ids) == 30
    assert per_delivery(receiver.all()) == Counter(dict.fromkeys(ids, 1))


def test_a_claim_made_on_a_stale_read_loses(sessions: sessionmaker[Session]) -> None:
    [(_, [row])] = fire(sessions, [{"type": "email", "to": "ops@example.com"}])
    one, two = make_deliverer(sessions), make_deliverer(sessions)
    assert one._claim(row.id, "pending", None, 0) is not None
    assert two._claim(row.id, "pending", None, 0) is None
    stored = rows(sessions)[row.id]
    assert stored.status == "sending" and stored.lease_until is not None
    assert two._claim(row.id, "sending", stored.lease_until, 0) is not None
    assert one._claim(row.id, "sending", stored.lease_until, 0) is None


def test_max_attempts_reached_marks_the_delivery_failed(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    receiver.answer = lambda: 500
    results: list[tuple[str, str]] = []
    clock = Clock()
    [(_, [row])] = fire(sessions, [webhook(receiver)])
    deliverer = make_deliverer(
        sessions,
        now=clock,
        max_attempts=3,
        base_delay=1.0,
        max_delay=10.0,
        on_result=lambda *r: results.append(r),
    )
    for _ in range(3):
        assert deliverer.run_due() == 1
        clock.advance(11)
    assert deliverer.run_due() == 0
    stored = rows(sessions)[row.id]
    assert (stored.status, stored.attempts, stored.last_error) == ("failed", 3, "HTTP 500")
    assert stored.delivered_at is None
    assert results == [("webhook", "retry"), ("webhook", "retry"), ("webhook", "failed")]
    assert len(receiver.all()) == 3


def test_retries_wait_a_capped_full_jitter_backoff(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    receiver.answer = lambda: 500
    clock = Clock()
    [(_, [row])] = fire(sessions, [webhook(receiver)])
    deliverer = make_deliverer(sessions, now=clock, base_delay=0.5, max_delay=4.0)
    waits = []
    for attempts in range(7):
        assert deliverer.run_due() == 1
        stored = rows(sessions)[row.id]
        assert (stored.status, stored.attempts) == ("pending", attempts + 1)
        wait = (stored.next_attempt_at - clock()).total_seconds()
        assert 0 <= wait <= min(4.0, 0.5 * 2**attempts) + 1e-6
        waits.append(wait)
        clock.advance(4.001)
    assert len(set(waits)) > 1  # jittered, not a fixed schedule


def test_email_without_smtp_url_fails_at_once(sessions: sessionmaker[Session]) -> None:
    results: list[tuple[str, str]] = []
    [(_, [row])] = fire(sessions, [{"type": "email", "to": "ops@example.com"}])
    deliverer = make_deliverer(sessions, on_result=lambda *r: results.append(r))
    assert deliverer.run_due() == 1
    stored = rows(sessions)[row.id]
    assert (stored.status, stored.attempts) == ("failed", 1)
    assert stored.last_error == "email: METERING_SMTP_URL is not set"
    assert results == [("email", "failed")]


def test_a_redirect_is_not_followed(sessions: sessionmaker[Session], receiver: Receiver) -> None:
    receiver.answer = lambda: 302
    receiver.location = receiver.url + "/elsewhere"
    [(_, [row])] = fire(sessions, [webhook(receiver)])
    assert make_deliverer(sessions).run_due() == 1
    assert [r.path for r in receiver.all()] == ["/hook"]
    stored = rows(sessions)[row.id]
    assert (stored.status, stored.last_error) == ("pending", "HTTP 302")


def test_send_time_check_refuses_a_private_address(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    [(_, [row])] = fire(sessions, [webhook(receiver)])
    assert make_deliverer(sessions, allow_private=False).run_due() == 1
    assert receiver.all() == []
    stored = rows(sessions)[row.id]
    assert stored.status == "pending"
    assert stored.last_error == f"url: {channel_rules.PRIVATE_RULE}"


def test_send_connects_to_the_address_it_checked(
    sessions: sessionmaker[Session], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "hooks.metering.invalid" exists only in this stand-in DNS (.invalid never resolves),
    # and 127.0.0.1 counts as public here: the request can only arrive if the sender
    # connects to the address it checked, with the name kept in the Host header.
    answers = {"hooks.metering.invalid": ["127.0.0.1"]}
    monkeypatch.setattr(channel_rules, "resolve_host", lambda host, port: answers[host])
    monkeypatch.setattr(channel_rules, "is_public", lambda address: str(address) == "127.0.0.1")
    port = receiver.url.split(":")[2].split("/")[0]
    channel = {
        "type": "webhook",
        "url": f"http://hooks.metering.invalid:{port}/hook",
        "secret": "k",
    }
    fire(sessions, [channel])
    deliverer = make_deliverer(sessions, allow_private=False)
    assert deliverer.run_due() == 1
    [got] = receiver.all()
    assert got.headers["Host"] == f"hooks.metering.invalid:{port}"
    assert verify_signature("k", got.body, got.headers["X-Metering-Signature"])
    # The name now resolves to a private address (DNS rebinding): nothing is sent.
    answers["hooks.metering.invalid"] = ["10.1.2.3"]
    [(_, [row])] = fire(sessions, [channel])
    assert deliverer.run_due() == 1
    assert len(receiver.all()) == 1
    assert rows(sessions)[row.id].last_error == f"url: {channel_rules.PRIVATE_RULE}"


def test_slack_gets_incoming_webhook_json(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    fired = fire(sessions, [{"type": "slack", "url": receiver.url}], project_id=None)
    with sessions.begin() as session:
        alert = BudgetAlertRow(
            id="alr_forecast",
            budget_id=fired[0][0].budget_id,
            tenant_id="acme",
            project_id=None,
            period="2026-11",
            kind="forecast",
            threshold="",
            arm=0,
            spend_usd=fired[0][0].spend_usd,
            amount_usd=fired[0][0].amount_usd,
            forecast_usd=fired[0][0].amount_usd * 3 / 2,
            at=datetime.now(UTC),
        )
        session.add(alert)
        outbox.enqueue(session, alert, [{"type": "slack", "url": receiver.url}], payload_of(alert))
    assert make_deliverer(sessions).run_due() == 2
    texts = []
    for got in receiver.all():
        assert got.headers["Content-Type"] == "application/json"
        assert "X-Metering-Signature" not in got.headers
        message = json.loads(got.body)
        assert set(message) == {"text"}
        assert isinstance(message["text"], str) and message["text"].strip()
        texts.append(message["text"])
    budget = fired[0][0].budget_id
    assert sorted(texts) == sorted(
        [
            f"Budget {budget} (tenant acme, all projects): 80% threshold crossed, "
            "spend $80.50 of $100.00 for 2026-11.",
            f"Budget {budget} (tenant acme, all projects): month-end forecast $150.00 exceeds "
            "the budget of $100.00 (spend so far $80.50) for 2026-11.",
        ]
    )


def test_deliveries_for_shows_each_alert_s_deliveries(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    channels = [webhook(receiver), {"type": "email", "to": "ops@example.com"}]
    [(alert, _)] = fire(sessions, channels)
    make_deliverer(sessions).run_due()
    with sessions() as session:
        shown = outbox.deliveries_for(session, [alert.id, "alr_none"])
        assert Deliverer.deliveries_for(session, [alert.id]) == {alert.id: shown[alert.id]}
    assert shown["alr_none"] == []
    webhook_shown, email_shown = shown[alert.id]
    delivered_at = webhook_shown.pop("delivered_at")
    assert webhook_shown == {
        "channel": "webhook",
        "target": receiver.url,
        "status": "delivered",
        "attempts": 1,
        "last_error": None,
    }
    assert datetime.fromisoformat(delivered_at).tzinfo is not None
    assert delivered_at.endswith("Z")
    assert email_shown == {
        "channel": "email",
        "target": "ops@example.com",
        "status": "failed",
        "attempts": 1,
        "last_error": "email: METERING_SMTP_URL is not set",
        "delivered_at": None,
    }
