"""The dashboard in headless Chromium (Debian's `chromium`, driven by Playwright): sign
in, the cards equal /v1/stats, no console errors, nothing fetched from anywhere but the
service (every other host fails to resolve: the network is off), screenshots on a laptop
and a phone, and a read key's session shows its tenant only."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from metering.app import create_app, wait_ready
from metering.clickhouse.client import forget_database, make_client
from metering.settings import Settings
from metering.simulate.demo import demo_hook
from tests.conftest import ADMIN_TOKEN

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # The network is off: every host but the service's fails to resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
SHOTS = Path(__file__).parents[2] / "build" / "screenshots"


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory, chdb_path: Path) -> Iterator[str]:
    """`serve --demo` in-process: 30 days of demo traffic, served by uvicorn. ClickHouse is
    a database of its own on the suite's chDB (one data path per process)."""
    from tests.conftest import TEST_DATABASE_URL

    tmp = tmp_path_factory.mktemp("demo")
    url = TEST_DATABASE_URL or f"sqlite:///{tmp / 'metering.db'}"
    if TEST_DATABASE_URL:  # its own schema on the server, dropped by the database fixture's rules
        pytest.skip("the browser test runs on the SQLite pass (the page reads no table twice)")
    database = f"demo_{uuid.uuid4().hex[:8]}"
    settings = Settings(
        data_dir=tmp / "data",
        clickhouse_url=f"chdb://{chdb_path}",
        clickhouse_database=database,
        database_url=url,
        admin_token=ADMIN_TOKEN,
        _env_file=None,  # type: ignore[call-arg]
    )
    app = create_app(settings, ADMIN_TOKEN, startup_hooks=[demo_hook], run_scheduler=False)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    wait_ready(app, timeout=240)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        make_client(f"chdb://{chdb_path}", "default").command(
            f"DROP DATABASE IF EXISTS `{database}`"
        )
        forget_database(f"chdb://{chdb_path}", database)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    assert shutil.which("chromium") or Path(CHROMIUM).exists(), (
        "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _open(
    browser: object, url: str, viewport: dict[str, int]
) -> tuple[object, list[str], list[str]]:
    from playwright.sync_api import Browser

    assert isinstance(browser, Browser)
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    page = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on(
        "request",
        lambda r: (
            None if r.url.startswith(url) or r.url.startswith("data:") else elsewhere.append(r.url)
        ),
    )
    return page, errors, elsewhere


def _sign_in(page: object, url: str, token: str) -> None:
    page.goto(f"{url}/dashboard")  # type: ignore[attr-defined]
    page.fill("input[name=token]", token)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_selector("[data-figure=requests]", timeout=60_000)  # type: ignore[attr-defined]
    page.wait_for_selector("footer", timeout=60_000)  # type: ignore[attr-defined]


def test_the_dashboard_in_chromium(demo_url: str, browser: object) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page, errors, elsewhere = _open(browser, demo_url, {"width": 1366, "height": 900})
    page.goto(f"{demo_url}/dashboard")  # type: ignore[attr-defined]
    page.fill("input[name=token]", "wrong")  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    assert page.locator("[role=alert]").count() == 1  # type: ignore[attr-defined]
    assert page.context.cookies() == []  # type: ignore[attr-defined]
    _sign_in(page, demo_url, ADMIN_TOKEN)
    cookie = page.context.cookies()[0]  # type: ignore[attr-defined]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    section = page.locator("section.cards")  # type: ignore[attr-defined]
    start, end = section.get_attribute("data-from"), section.get_attribute("data-to")
    stats = httpx.get(
        f"{demo_url}/v1/stats",
        params={"from": start, "to": end},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=60,
    ).json()
    for key in ("documents_reranked", "requests", "active_accounts", "avg_uptime_pct"):
        value = page.locator(f"[data-figure={key}]").get_attribute("data-value")  # type: ignore[attr-defined]
        assert value is not None
        if key == "avg_uptime_pct":
            assert float(value) == stats[key]
        else:
            assert value == str(stats[key]), key
    assert stats["requests"] > 1_000_000  # the demo month
    assert page.locator("text=Could not load").count() == 0  # type: ignore[attr-defined]
    page.screenshot(path=str(SHOTS / "dashboard-laptop.png"), full_page=True)  # type: ignore[attr-defined]
    page.screenshot(path=str(SHOTS / "dashboard.png"))  # type: ignore[attr-defined]
    # keyboard: the first tab stop is the skip link, then the window picker
    page.keyboard.press("Tab")  # type: ignore[attr-defined]
    assert page.evaluate("document.activeElement.className") == "skip"  # type: ignore[attr-defined]
    assert errors == [], errors
    assert elsewhere == [], elsewhere

    phone, errors, elsewhere = _open(browser, demo_url, {"width": 390, "height": 844})
    _sign_in(phone, demo_url, ADMIN_TOKEN)
    width = phone.evaluate("document.documentElement.scrollWidth")  # type: ignore[attr-defined]
    assert width <= 390, "no horizontal scrolling of the page on a phone (tables scroll inside)"
    phone.screenshot(path=str(SHOTS / "dashboard-phone.png"), full_page=False)  # type: ignore[attr-defined]
    assert errors == [] and elsewhere == []


def test_a_read_key_session_shows_its_tenant_only(demo_url: str, browser: object) -> None:
    tenant = httpx.get(
        f"{demo_url}/v1/requests?limit=1",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=60,
    ).json()["requests"][0]["tenant_id"]
    key = httpx.post(
        f"{demo_url}/v1/api-keys",
        json={"scopes": ["read"], "tenant_id": tenant},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    ).json()["key"]
    page, errors, elsewhere = _open(browser, demo_url, {"width": 1280, "height": 800})
    _sign_in(page, demo_url, key)
    assert f"Tenant {tenant}" in page.inner_text("header")  # type: ignore[attr-defined]
    accounts = page.locator("[data-figure=active_accounts]").get_attribute("data-value")  # type: ignore[attr-defined]
    assert accounts == "1"
    tenants = set(page.locator("table.log tbody tr td:nth-child(2)").all_inner_texts())  # type: ignore[attr-defined]
    assert tenants == {tenant}
    assert errors == [] and elsewhere == []
