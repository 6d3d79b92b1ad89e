"""The built-in dashboard over HTTP: sign-in, session cookie, tenant scoping, the cards'
exact figures, assets served locally, and a Content-Security-Policy that allows nothing
from elsewhere."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import ADMIN_TOKEN
from tests.ingest.helpers import event, probe

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CARD = re.compile(r'data-figure="(\w+)" data-value="([^"]*)"')


def _seed(client: TestClient) -> None:
    events = [event(i, tenant_id=f"acct-{i % 3}", documents=10 + i) for i in range(30)]
    events += [event("e1", status="error", tenant_id="acct-2")]
    r = client.post("/v1/events", json={"events": events}, headers=H)
    assert r.json()["accepted"] == 31
    probes = [probe(i, ok=i % 10 != 0) for i in range(20)]
    client.post("/v1/probes", json={"probes": probes}, headers=H)


def _sign_in(client: TestClient, token: str) -> Any:
    return client.post(
        "/dashboard/session",
        content=f"token={token}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )


def _cards(html: str) -> dict[str, str]:
    return dict(CARD.findall(html))


def _window(html: str) -> tuple[str, str]:
    m = re.search(r'data-from="([^"]+)" data-to="([^"]+)"', html)
    assert m, html[:2000]
    return m.group(1), m.group(2)


def test_without_a_session_the_page_is_the_sign_in_form(client: TestClient) -> None:
    r = client.get("/dashboard")
    assert r.status_code == 200
    assert '<input id="token" name="token" type="password"' in r.text
    assert "data-figure" not in r.text
    assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard"


def test_a_bad_token_gets_the_form_again_and_no_cookie(client: TestClient) -> None:
    for token in ("nope", "", "x" * 5000):
        r = _sign_in(client, token)
        assert r.status_code == 200
        assert "set-cookie" not in r.headers
        assert 'role="alert"' in r.text and 'name="token"' in r.text
    ingest = client.post("/v1/api-keys", json={"scopes": ["ingest"]}, headers=H).json()["key"]
    r = _sign_in(client, ingest)
    assert "set-cookie" not in r.headers and 'role="alert"' in r.text
    # a forged or tampered cookie is no session
    client.cookies.set("metering_session", "admin.9999999999.deadbeef")
    assert "data-figure" not in client.get("/dashboard").text


def test_admin_sees_the_platform_and_cards_equal_v1_stats(client: TestClient) -> None:
    _seed(client)
    r = _sign_in(client, ADMIN_TOKEN)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert ADMIN_TOKEN not in cookie
    page = client.get("/dashboard")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    html = page.text
    start, end = _window(html)
    stats = client.get("/v1/stats", params={"from": start, "to": end}, headers=H).json()
    cards = _cards(html)
    for key in ("documents_reranked", "requests", "active_accounts"):
        assert cards[key] == str(stats[key]), key
    assert float(cards["avg_uptime_pct"]) == stats["avg_uptime_pct"]
    assert cards["spend_usd"] == stats["spend_usd"]
    assert stats["requests"] == 31 and stats["active_accounts"] == 3
    for section in ("Providers", "Budgets", "Request log", "Usage per"):
        assert section in html
    assert "Could not load" not in html
    # every asset the page names is served by the service itself
    for asset in re.findall(r'(?:href|src)="(/[^"]+)"', html):
        if asset.startswith("/dashboard/static/"):
            assert client.get(asset).status_code == 200
    assert not re.search(r'(?:href|src)="https?://', html)


def test_a_read_key_sees_its_own_tenant_only(client: TestClient) -> None:
    _seed(client)
    key = client.post(
        "/v1/api-keys", json={"scopes": ["read"], "tenant_id": "acct-1"}, headers=H
    ).json()["key"]
    assert _sign_in(client, key).status_code == 303
    html = client.get("/dashboard?tenant_id=acct-2").text  # asking for another: its own
    assert "Tenant acct-1" in html
    start, end = _window(html)
    stats = client.get(
        "/v1/stats", params={"from": start, "to": end}, headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert _cards(html)["requests"] == str(stats["requests"]) == "10"
    assert "acct-2" not in html.split('id="log-h"')[1] and "acct-0" not in html
    assert 'name="tenant_id"' not in html.split("</header>")[0]  # no tenant picker


def test_window_picker_filters_and_paging(client: TestClient) -> None:
    _seed(client)
    _sign_in(client, ADMIN_TOKEN)
    html = client.get("/dashboard?window=24h&status=error").text
    assert 'aria-current="page">24h<' in html
    log = html.split('id="log-h"')[1]
    assert log.count("<tr><td>") == 1 and ">error<" in log
    first = client.get("/dashboard?window=7d").text
    nxt = re.search(r'href="\?([^"]+)#log-h" rel="next"', first)
    assert nxt, "30 events and 20 a page: a next page"
    second = client.get("/dashboard?" + nxt.group(1).replace("&amp;", "&")).text
    assert second.split('id="log-h"')[1].count("<tr><td>") == 11
    assert client.post("/dashboard/logout", follow_redirects=False).status_code == 303


def test_invoices_are_listed_with_html_and_pdf_for_the_session(client: TestClient) -> None:
    from datetime import UTC, datetime, timedelta

    last = datetime.now(UTC).replace(day=1) - timedelta(days=3)
    period = last.strftime("%Y-%m")
    events = [
        event(f"i{i}", tenant_id=f"acct-{i % 2}", timestamp=last.isoformat()) for i in range(6)
    ]
    assert client.post("/v1/events", json={"events": events}, headers=H).json()["accepted"] == 6
    r = client.post("/v1/invoices/run", json={"period": period, "finalize": True}, headers=H)
    assert r.status_code == 200, r.text
    _sign_in(client, ADMIN_TOKEN)
    html = client.get("/dashboard").text
    section = html.split('id="inv-h"')[1].split("</section>")[0]
    links = re.findall(r'href="(/dashboard/invoices/[^"]+)"', section)
    assert len(links) == 4  # two invoices, HTML and PDF each
    page = client.get(links[0])
    assert page.status_code == 200 and period in page.text
    pdf = client.get(links[1])
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    # a read key of acct-1 sees its own invoice only
    key = client.post(
        "/v1/api-keys", json={"scopes": ["read"], "tenant_id": "acct-1"}, headers=H
    ).json()["key"]
    _sign_in(client, key)
    mine = client.get("/dashboard").text.split('id="inv-h"')[1].split("</section>")[0]
    assert "acct-1" in mine and "acct-0" not in mine
    other = [link for link in links if link not in mine]
    assert client.get(other[0]).status_code == 404
    client.post("/dashboard/logout")
    client.cookies.clear()
    assert client.get(links[0], follow_redirects=False).status_code == 303
