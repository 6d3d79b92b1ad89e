"""Uptime probes of provider endpoints (the scheduler's `probe` job).

`METERING_PROBE_TARGETS` is a comma-separated list of `provider[@region]=URL`, e.g.
`cohere=https://api.cohere.com/health,azure@us-east=https://x.azure.com/health`.
Each run sends one GET per target; a target is up when it answers below 500 within
the timeout. Results go through the same exactly-once pipeline as `POST /v1/probes`.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import httpx

from metering.ingest.decode import Decoded
from metering.ingest.structs import Probe

if TYPE_CHECKING:
    from metering.services import Services

_TARGET = re.compile(
    r"^(?P<provider>[a-z0-9_-]{1,64})(?:@(?P<region>[^=]{1,64}))?=(?P<url>https?://\S+)$"
)
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Target:
    provider: str
    region: str
    url: str


def parse_targets(value: str | None) -> list[Target]:
    """Parse METERING_PROBE_TARGETS; a malformed entry is an error naming it."""
    targets: list[Target] = []
    for raw in (value or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        match = _TARGET.match(entry)
        if not match:
            raise ValueError(
                f"METERING_PROBE_TARGETS: {entry!r} must look like provider[@region]=http(s)://host/path"
            )
        targets.append(Target(match["provider"], match["region"] or "global", match["url"]))
    return targets


def probe(target: Target, client: httpx.Client) -> Probe:
    started = time.perf_counter()
    at = datetime.now(UTC)
    status: int | None = None
    error: str | None = None
    try:
        response = client.get(target.url)
        status = response.status_code
        ok = status < 500
        if not ok:
            error = f"HTTP {status}"
    except httpx.HTTPError as exc:
        ok = False
        error = f"{type(exc).__name__}: {exc}"[:1024]
    latency_ms = (time.perf_counter() - started) * 1000
    return Probe(
        probe_id=f"probe-{uuid.uuid4().hex}",
        timestamp=at,
        provider=target.provider,
        region=target.region,
        ok=ok,
        latency_ms=latency_ms,
        http_status=status if status is not None and 100 <= status <= 599 else None,
        error=error,
    )


def run_probes(services: Services) -> int:
    """Probe every configured target once; return how many results were stored."""
    targets = parse_targets(services.settings.probe_targets)
    if not targets:
        return 0
    with httpx.Client(timeout=PROBE_TIMEOUT, follow_redirects=False) as client:
        results = [probe(target, client) for target in targets]
    submitted = services.probes.submit(Decoded(results, []))
    services.probes.wait_durable(submitted)
    return submitted.accepted
