"""The dashboard's first paint and full load on a seed-scale month, in headless Chromium.

    .venv/bin/python -m bench.dashboard --data-dir /tmp/seed --results bench/RESULTS.md

The data dir must hold a month already (`python -m bench.analytics --data-dir D --fill-only`
makes the seed month: 24.5M events, 210K tenants). The bench starts `metering serve` on it,
signs in as the admin in Debian's Chromium (Playwright), and loads `/dashboard` K times,
reading the browser's own timings: first contentful paint, DOMContentLoaded and the load
event (every section streamed). Baseline in the same run, same browser and server: the
sign-in page (`/dashboard` without a session: the same server, shell and stylesheet, no
figures), so the ratio is what the figures cost on top of serving a page at all.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.analytics_http import Server, percentile

# The cards' render time comes from the Element Timing API (`elementtiming` on each card).
TIMING = """() => new Promise(resolve => {
  const nav = performance.getEntriesByType('navigation')[0];
  const fcp = performance.getEntriesByName('first-contentful-paint')[0];
  const out = {fcp: fcp ? fcp.startTime : null, cards: null,
               dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd};
  new PerformanceObserver(list => {
    for (const e of list.getEntries())
      if (e.identifier.startsWith('card-'))
        out.cards = Math.max(out.cards || 0, e.renderTime || e.loadTime);
    resolve(out);
  }).observe({type: 'element', buffered: true});
  setTimeout(() => resolve(out), 2000);
})"""
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--loads", type=int, default=10, help="timed page loads (K)")
    parser.add_argument("--window", default="30d")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--note", default="")
    return parser.parse_args(argv)


def _timings(page: Any, url: str, k: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"fcp": [], "cards": [], "dcl": [], "load": []}
    for _ in range(k + 1):  # one warm-up
        page.goto(url, wait_until="load", timeout=120_000)
        t = page.evaluate(TIMING)
        for key in out:
            if t[key] is not None:
                out[key].append(float(t[key]))
    return {key: values[1:] for key, values in out.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from playwright.sync_api import sync_playwright

    token = "bench-" + secrets.token_hex(8)
    server = Server(args.data_dir, token)
    started = server.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            base = browser.new_page(viewport={"width": 1366, "height": 900})
            baseline = _timings(base, f"{server.base}/dashboard", args.loads)
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(f"{server.base}/dashboard")
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.wait_for_selector("footer", timeout=120_000)
            timed = _timings(page, f"{server.base}/dashboard?window={args.window}", args.loads)
            requests = page.locator("[data-figure=requests]").get_attribute("data-value")
            browser.close()
    finally:
        server.stop()
    rows = []
    for key, name in (
        ("fcp", "first contentful paint"),
        ("cards", "the four cards rendered"),
        ("dcl", "DOMContentLoaded"),
        ("load", "load (all sections)"),
    ):
        p50, p99 = percentile(timed[key], 0.5), percentile(timed[key], 0.99)
        if not timed[key]:
            continue
        base = baseline[key] or baseline["fcp"]  # the sign-in page has no cards: its paint
        b50 = percentile(base, 0.5)
        rows.append(f"| {name} | {p50:.0f} | {p99:.0f} | {b50:.0f} | {p50 / b50:.1f}x |")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = shlex.join(["python", "-m", "bench.dashboard", *(argv or sys.argv[1:])])
    block = "\n".join(
        [
            "",
            f"## Dashboard first paint and full load in Chromium (bench/dashboard.py), {when}",
            "",
            f"- Command: `{command}`",
            f"- Machine: {os.cpu_count()} cores, {platform.machine()}, load {load};"
            f" server ready in {started:.1f} s",
            f"- Data: `{args.data_dir}`, window {args.window}, requests card = {requests};"
            f" K = {args.loads} loads after one warm-up",
            f"- Baseline (same run, same browser and server): the sign-in page. {args.note}",
            "",
            "| timing | p50 ms | p99 ms | baseline p50 ms | ratio |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(block)
    if args.results:
        with args.results.open("a") as f:
            f.write(block + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
