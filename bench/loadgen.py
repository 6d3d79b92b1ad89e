"""A cheap load generator for `POST /v1/events`: pre-built bodies, raw HTTP/1.1.

Two parts:

- `build_lines` makes realistic, deterministic rerank events (~360 bytes of JSON each,
  unique event ids) as JSON lines. The same arguments give the same bytes in any
  process, so the engine-ceiling subprocess of bench/ingest.py regenerates the very rows
  the HTTP run sent instead of passing a gigabyte through a pipe.
- `run_load` sends pre-built requests over a few keep-alive connections with asyncio
  streams: a hand-written POST, then the status line, headers and a Content-Length body
  are read back. No HTTP library sits on the hot path, so the generator needs a small
  fraction of a core and leaves the rest to the server it shares the machine with.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

PROVIDERS: dict[str, tuple[str, ...]] = {
    "cohere": ("rerank-4-pro", "rerank-4-fast", "rerank-v3.5"),
    "voyage": ("rerank-2.5", "rerank-2.5-lite"),
    "jina": ("jina-reranker-v3", "jina-reranker-m0"),
    "mixedbread": ("mxbai-rerank-large-v2",),
}
PROVIDER_WEIGHTS = (0.45, 0.3, 0.15, 0.1)
REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "ap-southeast-1")
REGION_WEIGHTS = (0.5, 0.2, 0.2, 0.1)
ERRORS = (
    (429, "rate_limited"),
    (500, "provider_5xx"),
    (502, "provider_5xx"),
    (503, "provider_5xx"),
    (504, "timeout"),
)


def _cumulative(weights: Sequence[float]) -> list[float]:
    total = 0.0
    out: list[float] = []
    for weight in weights:
        total += weight
        out.append(total)
    return out


def build_lines(
    count: int,
    *,
    seed: int,
    run_id: str,
    base_epoch: float,
    span_seconds: float = 600.0,
    tenants: int = 5_000,
) -> list[bytes]:
    """`count` distinct events as JSON objects (one `bytes` per event, no newline).

    Event ids are `evt_<run_id>_<n>`, unique within the run. Timestamps rise from
    `base_epoch` over `span_seconds` (pass a `base_epoch` at least `span_seconds` in the
    past: the service refuses timestamps more than 5 minutes ahead). Tenants follow a
    Zipf-like law over `tenants` accounts with 1-3 projects each; 3% of events are
    errors and 5% carry one failed fallback attempt, as gateway traffic does.
    """
    rng = random.Random(seed)
    tenant_names = [f"acct_{rng.getrandbits(40):010x}" for _ in range(tenants)]
    projects = [
        [f"proj_{name[5:13]}_{p}" for p in range(rng.randint(1, 3))] for name in tenant_names
    ]
    api_keys = [f"key_{rng.getrandbits(64):016x}" for _ in range(tenants)]
    tenant_cw = _cumulative([1.0 / (rank + 1) ** 0.9 for rank in range(tenants)])
    provider_names = list(PROVIDERS)
    provider_cw = _cumulative(PROVIDER_WEIGHTS)
    region_cw = _cumulative(REGION_WEIGHTS)

    tenant_idx = rng.choices(range(tenants), cum_weights=tenant_cw, k=count)
    provider_pick = rng.choices(provider_names, cum_weights=provider_cw, k=count)
    region_pick = rng.choices(REGIONS, cum_weights=region_cw, k=count)

    seconds: dict[int, str] = {}
    step = span_seconds / max(count, 1)
    rand = rng.random
    randint = rng.randint
    lines: list[bytes] = []
    append = lines.append
    for n in range(count):
        ts = base_epoch + n * step
        whole = int(ts)
        prefix = seconds.get(whole)
        if prefix is None:
            prefix = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            seconds[whole] = prefix
        millis = int((ts - whole) * 1000)
        t = tenant_idx[n]
        tenant_projects = projects[t]
        project = tenant_projects[n % len(tenant_projects)]
        provider = provider_pick[n]
        models = PROVIDERS[provider]
        model = models[n % len(models)]
        documents = randint(1, 200)
        queries = 1 if rand() < 0.9 else randint(2, 4)
        tokens = documents * randint(40, 160)
        latency = 40.0 + documents * 1.5 + rand() * 200.0
        if rand() < 0.03:
            http_status, error_type = ERRORS[n % len(ERRORS)]
            outcome = f'"status":"error","http_status":{http_status},"error_type":"{error_type}"'
        else:
            outcome = '"status":"ok","http_status":200'
        extra = ""
        if rand() < 0.05:
            other = provider_names[(provider_names.index(provider) + 1) % len(provider_names)]
            extra = (
                f',"fallbacks":[{{"provider":"{other}","model":"{PROVIDERS[other][0]}",'
                f'"region":"{region_pick[n]}","latency_ms":{2000.0 + rand() * 1000.0:.1f},'
                f'"error_type":"timeout","http_status":504}}]'
            )
        append(
            (
                f'{{"event_id":"evt_{run_id}_{n:09d}","timestamp":"{prefix}.{millis:03d}+00:00",'
                f'"tenant_id":"{tenant_names[t]}","project_id":"{project}",'
                f'"api_key_id":"{api_keys[t]}","provider":"{provider}","model":"{model}",'
                f'"region":"{region_pick[n]}",{outcome},"queries":{queries},'
                f'"documents":{documents},"input_tokens":{tokens},"output_tokens":0,'
                f'"latency_ms":{latency:.1f}{extra}}}'
            ).encode()
        )
    return lines


def batches(lines: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(lines), size):
        yield lines[start : start + size]


def json_body(lines: Sequence[bytes]) -> bytes:
    """`{"events": [...]}` around already-encoded events."""
    return b'{"events":[' + b",".join(lines) + b"]}"


def ndjson(lines: Sequence[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def digest(lines: Sequence[bytes]) -> str:
    """A fingerprint of the rows, to check two processes built the same ones."""
    h = hashlib.blake2b(digest_size=16)
    for line in lines:
        h.update(line)
        h.update(b"\n")
    return h.hexdigest()


def post_request(host: str, port: int, token: str, body: bytes, path: str = "/v1/events") -> bytes:
    """A complete HTTP/1.1 keep-alive POST, headers and body, ready to write."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode()
    return head + body


class HttpError(RuntimeError):
    """The server answered something the generator did not expect."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = -1
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length < 0:
        raise HttpError(f"response without Content-Length: {head[:200]!r}")
    body = await reader.readexactly(length) if length else b""
    return status, body


class IngestReply(msgspec.Struct):
    accepted: int
    duplicates: int
    rejected: list[msgspec.Raw]


_reply_decoder = msgspec.json.Decoder(IngestReply)


@dataclass
class LoadResult:
    requests: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, per request
    done_at: list[float] = field(default_factory=list)  # perf_counter at each reply
    started: float = 0.0
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return self.finished - self.started


async def run_load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    expect_accepted: Sequence[int],
    concurrency: int,
    on_reply: Callable[[int], None] | None = None,
) -> LoadResult:
    """Send every pre-built request once over `concurrency` keep-alive connections.

    A request counts as good only if the reply is 202 with `accepted` equal to its
    entry in `expect_accepted`, no duplicate and no rejection; anything else is recorded
    in `failures` (the run goes on, the caller decides).
    """
    result = LoadResult()
    order = iter(range(len(requests)))
    clock = time.perf_counter

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        try:
            for index in order:
                sent = clock()
                writer.write(requests[index])
                await writer.drain()
                status, body = await read_response(reader)
                now = clock()
                result.latencies.append(now - sent)
                result.done_at.append(now)
                result.requests += 1
                if status != 202:
                    result.failures.append(f"request {index}: HTTP {status} {body[:200]!r}")
                    continue
                reply = _reply_decoder.decode(body)
                result.accepted += reply.accepted
                result.duplicates += reply.duplicates
                result.rejected += len(reply.rejected)
                if reply.accepted != expect_accepted[index] or reply.rejected:
                    result.failures.append(f"request {index}: {body[:300]!r}")
                if on_reply is not None:
                    on_reply(reply.accepted)
        finally:
            writer.close()
            await writer.wait_closed()

    result.started = clock()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    result.finished = clock()
    return result


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it is, with uvicorn[standard]): cheaper per request."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
