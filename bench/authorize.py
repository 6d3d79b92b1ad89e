"""Budgets' speed figures (issue 7, acceptance 3): the spend ledger in process, and
`POST /v1/authorize` over HTTP on loopback, alone and while ingest runs.

    cd /work/main && .venv/bin/python -m bench.authorize [--parts inproc,http,mixed,flood]
        [--tenants 210000] [--fraction 0.1] [--rate 2000] [--seconds 20]
        [--connections 8] [--authorize-port] [--trace DIR] [--results bench/RESULTS.md]
        [--note "..."]

Parts (each figure absolute and as a ratio to a baseline measured in the same run):

- `inproc` (bench/authorize_inproc.py): `SpendLedger.check` with the spend cache warm and
  cold, and `prepare` per event; baseline `json.dumps` of a small dict in the same loop.
- `http`: a `metering serve` subprocess on a fresh temp data dir (SQLite, chDB). Set-up:
  start, post the price book, ingest a few events for each of the N tenants (registers
  them and gives every budgeted scope usage under 1-3 price entries), stop, write the
  budgets into SQLite, start again (the server rebuilds their spend from ClickHouse:
  the second start-up time is reported). Then, open loop at `--rate` for `--seconds`
  over `--connections` keep-alive connections (bench/authorize_load.py): GET /healthz
  (baseline), then POST /v1/authorize with an ingest key, tenants drawn at random, half
  of them budgeted.
- `mixed`: the maximum ingest rate of bench/loadgen.py's generator against this server
  (closed loop, 4 connections, ~10 s), then ingest paced at half of it (its own process)
  while /healthz (baseline) and then /v1/authorize run at `--rate` as above. The paced
  ingest is sized for eight times the runs' nominal time and stopped after them; whether
  it was on from each run's first request to its last is checked (wall clock) and
  reported under the table.
- `--authorize-port`: the server also gets METERING_AUTHORIZE_PORT (a free port: a
  separate process answering only POST /v1/authorize and GET /healthz); `http` and
  `mixed` each add a run of the same authorize requests against that port, after the
  main port's, with the same baseline and target (its server CPU adds that process's).
- `flood` (with `--authorize-port`): what a flood of checks costs ingest. Ingest at its
  maximum until all stored, alone, then under a closed-loop flood of valid checks on the
  authorize port, then of one unknown key sent again and again (401, remembered after the
  first lookup), then of a fresh unknown key each time (401 after a database lookup
  each), then alone again; each as a ratio to the mean of the two alone runs. Run it
  with and without `--authorize-realtime` to see what the real-time priority costs ingest
  under a flood.

The parts live next to this file: bench/authorize_setup.py (tenants, budgets, prices,
seed events), bench/authorize_http.py (the server and the runs), bench/authorize_load.py
(the open-loop generator, the ingest worker), bench/authorize_asgi.py (the app's CPU per
request, in process), bench/authorize_inproc.py (the ledger in process).

The generator is checked, not assumed, not to be the bottleneck: the report gives its
CPU (fraction of one core), how late its sends were against their due times, and the
achieved rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.authorize_http import FLOOD_CONNECTIONS, load, run_http
from bench.ingest_report import code_version


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="inproc,http,mixed,asgi")
    parser.add_argument("--tenants", type=int, default=210_000)
    parser.add_argument("--fraction", type=float, default=0.1, help="tenants with budgets")
    parser.add_argument("--rate", type=float, default=2_000.0, help="requests/s, open loop")
    parser.add_argument("--seconds", type=float, default=20.0, help="per open-loop run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="in-process rounds")
    parser.add_argument("--ingest-max-events", type=int, default=1_500_000)
    parser.add_argument(
        "--ingest-basis",
        choices=["stored", "accepted"],
        default="stored",
        help="mixed: the maximum halved is events/s until all stored (end to end, the"
        " default) or events/s acknowledged (the spool absorbs a burst: not sustainable)",
    )
    parser.add_argument(
        "--ingest-rate",
        type=float,
        default=0.0,
        help="mixed: pace ingest at this many events/s instead of half the measured maximum"
        " (to compare server variants at one load)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--wait-quiet", type=float, default=60.0)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--note", default="")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help=(
            "py-spy record the server during the authorize run alone (raw collapsed stacks),"
            " and during the mixed one into the same name with suffix .mixed.txt"
        ),
    )
    parser.add_argument(
        "--authorize-port",
        action="store_true",
        help="start the server with METERING_AUTHORIZE_PORT (a free port) and add runs of"
        " POST /v1/authorize against that port (alone and under ingest)",
    )
    parser.add_argument(
        "--authorize-nice",
        type=int,
        default=-5,
        help="with --authorize-port: METERING_AUTHORIZE_NICE for the server (default -5)",
    )
    parser.add_argument(
        "--generator-slice-us",
        type=int,
        default=0,
        help="give the HTTP load generator (this process's main thread) a CPU slice of N us"
        " (Linux 6.12+), so that its own wait for a core counts less in the latencies it"
        " measures (default 0: the kernel's)",
    )
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=0,
        help="run the HTTP load generator's thread at this nice value (below 0 needs"
        " CAP_SYS_NICE): a diagnosis of how much of a tail is the generator's own wait for"
        " a core (a gateway on its own machine does not share the server's cores)",
    )
    parser.add_argument(
        "--authorize-slice-us",
        type=int,
        default=0,
        help="with --authorize-port: METERING_AUTHORIZE_SLICE_US for the server (default"
        " 0: the kernel's)",
    )
    parser.add_argument(
        "--authorize-realtime",
        type=int,
        default=0,
        help="with --authorize-port: METERING_AUTHORIZE_REALTIME_PRIORITY for the server"
        " (SCHED_RR 1-99; default 0: off)",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="write each HTTP run's requests (send time, latency) to DIR/<run>.csv",
    )
    return parser.parse_args(argv)


# -- report ---------------------------------------------------------------------------------


def render_coverage(h: dict[str, Any]) -> list[str]:
    """Whether the paced ingest was on during the whole of each mixed run."""
    runs = [r for r in h.get("mixed", []) if "ingest_covered" in r]
    if not runs:
        return []
    p = h["ingest_paced"]
    ended = (
        "stopped after the runs"
        if p.get("stopped_early")
        else f"ran out of its {p.get('events_built', 0):,} events before being stopped"
    )
    parts = [
        f"{r['name']}: {'yes' if r['ingest_covered'] else 'NO'} (on from "
        f"{r['ingest_lead_s']:.2f} s before its first request to {r['ingest_tail_s']:.2f} s "
        "after its last reply)"
        for r in runs
    ]
    rows = [
        "",
        f"Ingest covered the whole run (wall clock; the paced ingest {ended}): "
        + "; ".join(parts)
        + ".",
    ]
    missed = [r["name"] for r in runs if not r["ingest_covered"]]
    if missed:
        rows += [
            "",
            f"**WARNING: ingest was NOT on during the whole of {', '.join(missed)}: those "
            "rows are not figures under ingest.**",
        ]
    return rows


def render_flood(h: dict[str, Any]) -> list[str]:
    """Ingest at its maximum with and without a flood of checks on the authorize port."""
    runs = h.get("flood")
    if not runs:
        return []
    alone = [r["stored_per_s"] for r in runs if "flood" not in r]
    base = sum(alone) / len(alone)
    rows = [
        "",
        f"A flood of checks on the authorize port ({FLOOD_CONNECTIONS} connections, closed "
        f"loop) while ingest runs at its maximum ({runs[0]['events']:,} events, 4 "
        "connections, until all stored); the ratio is to the mean of the two runs alone:",
        "",
        "| run | stored events/s | ratio to alone | checks answered /s | check statuses "
        "| main CPU | authorize CPU | flood generator CPU | stolen by the hypervisor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        f = r.get("flood")
        checks = f"{f['checks_per_s']:,.0f}" if f else "-"
        statuses = str(f["statuses"]) if f else "-"
        gen = f"{f['cpu_seconds'] / f['seconds']:.0%}" if f else "-"
        rows.append(
            f"| {r['name']} | {r['stored_per_s']:,.0f} | {r['stored_per_s'] / base:.2f} | "
            f"{checks} | {statuses} | {r['main_cpu']:.0%} | {r['authorize_cpu']:.0%} | {gen} | "
            f"{r['steal']:.1%} of a core |"
        )
    return rows


def render_http(h: dict[str, Any]) -> list[str]:
    rows = [
        f"Server: {h['tenants']:,} tenants registered by ingesting {h['seed_events']:,} seed "
        f"events ({h['seed_s']:.1f} s), {h['budgets']:,} budgets on {h['budgeted_tenants']:,} "
        f"tenants ({h['hard']:,} hard) written into SQLite, then a restart: ready in "
        f"{h['start2_s']:.1f} s (first start on the empty dir {h['start1_s']:.1f} s; the "
        f"second includes the budgets' spend rebuilt from ClickHouse). RSS after start "
        f"{h['rss_after_start_mib']:.0f} MiB, peak {h['rss_end_mib']:.0f} MiB. Start-up work "
        f"(the first reconciliation and forecasts, {h['alerts_at_start']:,.0f} alerts the "
        f"loaded spend crossed) settled {h['settle_s']:.0f} s after ready; the runs start "
        f"after it. Exact resyncs of all budget scopes (at start, then the minute's "
        f"reconciliation, writer held meanwhile): {h['resyncs']:.0f}, "
        f"{h['resync_s'] / max(h['resyncs'], 1):.2f} s each on average.",
    ]
    if h.get("alone") or h.get("mixed"):
        rows += [
            "",
            "| run | sent | achieved /s | p50 ms | p99 ms | max ms | p99 / baseline p99 "
            "| target | verdict | send late p99 / max ms | generator CPU | server CPU | "
            "denied | statuses | load before -> after | stolen by the hypervisor |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for key, target in (("alone", 2.0), ("mixed", 5.0)):
        runs = h.get(key)
        if not runs:
            continue
        base = runs[0]["p99"]
        for n, r in enumerate(runs):
            is_auth = n > 0
            verdict = ("met" if r["p99"] <= target else "MISSED") if is_auth else "-"
            if r.get("ingest_covered") is False:
                verdict += " (INGEST OFF FOR PART OF THE RUN)"
            cpu = f"{r['server_cpu']:.0%}"
            stolen = f"{r['steal']:.1%} of a core" if "steal" in r else "-"
            if "authorize_cpu" in r:
                cpu += f" (main {r['main_cpu']:.0%} + authorize {r['authorize_cpu']:.0%})"
            rows.append(
                f"| {r['name']} | {r['sent']:,} | {r['rate']:,.0f} | {r['p50']:.2f} | "
                f"{r['p99']:.2f} | {r['max']:.1f} | {r['p99'] / base:.2f} | "
                f"{f'p99 ≤ {target:g} ms' if is_auth else '-'} | {verdict} | "
                f"{r['late_p99']:.2f} / {r['late_max']:.1f} | {r['gen_cpu']:.0%} | "
                f"{cpu} | {r['denied']:,} | {r['statuses']} | {r['load']} | {stolen} |"
            )
    if "authorize_port" in h:
        rows += [
            "",
            f"Authorize port (METERING_AUTHORIZE_PORT={h['authorize_port']}): its process(es)"
            f" {h.get('authorize_pids', '?')}; its rows' server CPU adds theirs to the main"
            " process's.",
        ]
    if "asgi" in h:
        a = h["asgi"]
        rows += [
            "",
            f"The app's own CPU per request (ASGI called in process, no network; "
            f"bench/authorize_asgi.py, median of {a['rounds']} rounds of {a['per_round']:,}): "
            f"GET /healthz {a['healthz_us']:.0f} µs, POST /v1/authorize "
            f"{a['authorize_us']:.0f} µs (ratio {a['authorize_us'] / a['healthz_us']:.2f}); "
            f"statuses {a['statuses']}. At 2,000/s authorize alone needs "
            f"{a['authorize_us'] * 2000 / 1e6:.0%} of the one event loop.",
        ]
    rows += render_coverage(h)
    rows += render_flood(h)
    if "ingest_max" in h:
        m, p = h["ingest_max"], h["ingest_paced"]
        rows += [
            "",
            f"Ingest on this server (210K tenants, budgets on): maximum "
            f"{m['events_per_s']:,.0f} events/s acknowledged ({m['events']:,} events in "
            f"{m['seconds']:.1f} s, closed loop, 4 connections, server CPU "
            f"{m['server_cpu']:.0%}, generator CPU {m['cpu_seconds'] / m['seconds']:.0%}, "
            f"{m['failures']} failures), "
            f"{m.get('stored_per_s', float('nan')):,.0f} events/s until all stored (the "
            f"halved basis: {h.get('ingest_basis', 'accepted')}); during the "
            f"mixed runs paced at {p['target']:,.0f}/s: achieved {p['events_per_s']:,.0f} "
            f"events/s over {p['seconds']:.1f} s (worst send lateness {p['late_max_s']:.2f} s, "
            f"{p['failures']} failures, generator CPU {p['cpu_seconds'] / p['seconds']:.0%}).",
        ]
    elif "ingest_paced" in h:
        p = h["ingest_paced"]
        rows += [
            "",
            f"Ingest on this server (210K tenants, budgets on) paced at a fixed "
            f"{p['target']:,.0f}/s (--ingest-rate; no maximum measured in this run): achieved "
            f"{p['events_per_s']:,.0f} events/s over {p['seconds']:.1f} s (worst send lateness "
            f"{p['late_max_s']:.2f} s, {p['failures']} failures).",
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = set(args.parts.split(","))
    command = "python -m bench.authorize " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = load()
    lines = [
        f"### bench/authorize.py, {started}",
        "",
        f"Command: `{command}`  ",
        f"Machine: nproc {os.cpu_count()}, Python {platform.python_version()}, "
        f"load average {load_before} before  ",
        f"Code: {code_version()}  ",
    ]
    if args.note:
        lines.append(f"Note: {args.note}  ")
    lines.append("")
    ok = True
    if "inproc" in parts:
        from bench.authorize_inproc import measure, render

        m = measure(args.tenants, args.fraction, args.seed, args.rounds)
        block = render(m)
        print("\n".join(block), flush=True)
        lines += ["In process (`SpendLedger`):", "", *block, ""]
        ok &= all(m["check"][k] <= 50e-6 for k in ("all", "warm", "cold"))
    if parts & {"http", "mixed", "asgi", "flood"}:
        work = Path(tempfile.mkdtemp(prefix="bench-authorize-"))
        try:
            h = run_http(args, work, parts)
        finally:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        block = render_http(h)
        print("\n".join(block), flush=True)
        lines += [
            f"Over HTTP on loopback (open loop {args.rate:,.0f}/s for {args.seconds:g} s "
            f"per run, {args.connections} keep-alive connections; latency = request "
            "written -> reply read, nearest-rank percentiles):",
            "",
            *block,
            "",
        ]
        for key, target in (("alone", 2.0), ("mixed", 5.0)):
            if key in h:
                ok &= all(r["p99"] <= target for r in h[key][1:])
                ok &= all(r.get("ingest_covered", True) for r in h[key])
    lines.append(f"Load average after: {load()}")
    text = "\n".join(lines)
    if args.results is not None:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")
        print(f"appended to {args.results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
