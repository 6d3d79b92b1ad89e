"""The contract's event and probe as typed msgspec Structs, and the bounds they carry.

msgspec decodes and validates a whole batch into these in one call (~3x faster than
pydantic here). Field names are the ClickHouse column names. Rules msgspec cannot check
itself (the timestamp window, character sets) live in `rules.py`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

import msgspec

MAX_BATCH_EVENTS = 10_000
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_FUTURE = timedelta(minutes=5)
MAX_AGE = timedelta(days=400)
MAX_FALLBACKS = 16  # contract v1.1: at most 16 failed attempts per event
MAX_LATENCY_MS = 86_400_000  # one day: larger values are clock or unit errors

ACCOUNT_PATTERN = r"^[A-Za-z0-9_.:-]+\Z"  # \Z, not $: "$" also matches before a final newline
PROVIDER_PATTERN = r"^[a-z0-9_-]+\Z"

# Character-set rules are checked by `rules.check_event` over the distinct values of a batch
# (with a cache): msgspec's per-value regex made the whole decode 3x slower.
AccountId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
ProviderName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
LatencyMs = Annotated[float, msgspec.Meta(ge=0, le=MAX_LATENCY_MS)]
# Storage bounds the contract leaves open: token counts fit sums over years of events in
# ClickHouse's UInt64, queries fit UInt32.
MAX_TOKENS = 10**12
MAX_QUERIES = 2**32 - 1
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
HttpStatus = Annotated[int, msgspec.Meta(ge=100, le=599)]
Short = Annotated[str, msgspec.Meta(max_length=64)]


class Fallback(msgspec.Struct, gc=False):
    """A failed attempt before the provider that finally served (or last failed)."""

    provider: ProviderName
    latency_ms: LatencyMs
    model: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    region: Short | None = None
    error_type: Short | None = None
    http_status: HttpStatus | None = None


class Event(msgspec.Struct, gc=False):
    """One gateway rerank request. Field names are the ClickHouse column names."""

    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    timestamp: AwareDatetime
    tenant_id: AccountId
    project_id: AccountId
    provider: ProviderName
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    status: Literal["ok", "error"]
    documents: Annotated[int, msgspec.Meta(ge=0, le=100_000)]
    input_tokens: Tokens
    latency_ms: LatencyMs
    api_key_id: Short | None = None
    region: Short = "global"
    http_status: HttpStatus | None = None
    error_type: Short | None = None
    queries: Annotated[int, msgspec.Meta(ge=1, le=MAX_QUERIES)] = 1
    output_tokens: Tokens = 0
    # max_length is checked after the list is built: decode.py counts the attempts of a
    # large item before decoding it, so an event with millions of them costs a scan only.
    fallbacks: Annotated[tuple[Fallback, ...], msgspec.Meta(max_length=MAX_FALLBACKS)] = ()


class Probe(msgspec.Struct, gc=False):
    """One uptime probe result."""

    probe_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    timestamp: AwareDatetime
    provider: ProviderName
    ok: bool
    latency_ms: LatencyMs
    region: Short = "global"
    http_status: HttpStatus | None = None
    error: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
