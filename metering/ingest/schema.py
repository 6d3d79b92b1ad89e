"""The contract's event and probe schemas, and batch decoding with per-item errors.

Hot path: msgspec decodes and validates a whole batch into typed Structs in one call
(~3x faster than pydantic here). Only a batch that holds an invalid item takes the slow
path, where each item is decoded alone and an invalid one is explained by `explain_*`,
which lists every broken rule as "field: rule". msgspec alone decides validity; the
explainers only word it, so the two paths cannot disagree on what is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from itertools import chain
from operator import attrgetter
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

MAX_BATCH_EVENTS = 10_000
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_FUTURE = timedelta(minutes=5)
MAX_AGE = timedelta(days=400)

_ACCOUNT = r"^[A-Za-z0-9_.:-]+\Z"  # \Z, not $: "$" also matches before a final newline
_PROVIDER = r"^[a-z0-9_-]+\Z"

# Character-set rules are checked by `post_check` over the distinct values of a batch
# (with a cache): msgspec's per-value regex made the whole decode 3x slower.
AccountId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
ProviderName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
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
    latency_ms: NonNegFloat
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
    latency_ms: NonNegFloat
    api_key_id: Short | None = None
    region: Short = "global"
    http_status: HttpStatus | None = None
    error_type: Short | None = None
    queries: Annotated[int, msgspec.Meta(ge=1, le=MAX_QUERIES)] = 1
    output_tokens: Tokens = 0
    fallbacks: tuple[Fallback, ...] = ()


class Probe(msgspec.Struct, gc=False):
    """One uptime probe result."""

    probe_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    timestamp: AwareDatetime
    provider: ProviderName
    ok: bool
    latency_ms: NonNegFloat
    region: Short = "global"
    http_status: HttpStatus | None = None
    error: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


# ---------------------------------------------------------------------------------------
# Explaining invalid items: every broken rule, worded "field: rule".

_ACCOUNT_RE = re.compile(_ACCOUNT)
_PROVIDER_RE = re.compile(_PROVIDER)
_MISSING = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_str(
    errors: list[str],
    name: str,
    value: Any,
    *,
    required: bool,
    min_len: int = 0,
    max_len: int,
    pattern: re.Pattern[str] | None = None,
    charset: str = "",
) -> None:
    if value is _MISSING or (value is None and not required):
        if required:
            errors.append(f"{name}: required")
        return
    if not isinstance(value, str):
        errors.append(f"{name}: must be a string")
        return
    if len(value) < min_len:
        errors.append(f"{name}: must not be empty")
    elif len(value) > max_len:
        errors.append(f"{name}: must be at most {max_len} characters")
    if pattern is not None and value and not pattern.match(value):
        errors.append(f"{name}: must contain only {charset}")


def _check_int(
    errors: list[str],
    name: str,
    value: Any,
    *,
    required: bool,
    ge: int | None = None,
    le: int | None = None,
) -> None:
    if value is _MISSING or (value is None and not required):
        if required:
            errors.append(f"{name}: required")
        return
    if not _is_int(value):
        errors.append(f"{name}: must be an integer")
        return
    if ge is not None and value < ge:
        errors.append(f"{name}: must be >= {ge}")
    if le is not None and value > le:
        errors.append(f"{name}: must be <= {le}")


def _check_number(errors: list[str], name: str, value: Any, *, required: bool) -> None:
    if value is _MISSING or (value is None and not required):
        if required:
            errors.append(f"{name}: required")
        return
    if not _is_number(value):
        errors.append(f"{name}: must be a number")
    elif value < 0:
        errors.append(f"{name}: must be >= 0")


def _check_timestamp(errors: list[str], value: Any) -> None:
    if value is _MISSING:
        errors.append("timestamp: required")
        return
    if not isinstance(value, str):
        errors.append("timestamp: must be an RFC 3339 string with a UTC offset")
        return
    try:
        parsed = msgspec.json.decode(msgspec.json.encode(value), type=datetime)
    except msgspec.ValidationError:
        errors.append("timestamp: must be an RFC 3339 timestamp, e.g. 2026-11-27T10:00:00Z")
        return
    if parsed.tzinfo is None:
        errors.append("timestamp: must include a UTC offset (Z or +hh:mm)")
        return
    window_error = timestamp_window_error(parsed, *window(datetime.now(UTC)))
    if window_error:
        errors.append(window_error)


_ACCOUNT_RULE = "must contain only [A-Za-z0-9_.:-]"
_PROVIDER_RULE = "must contain only [a-z0-9_-]"
# Values already seen to match their character set (bounded; cleared when large).
_good_accounts: set[str] = set()
_good_providers: set[str] = set()


def _charset(good: set[str], pattern: re.Pattern[str], value: str) -> bool:
    if value in good:
        return True
    if pattern.match(value) is None:
        return False
    if len(good) > 200_000:
        good.clear()
    good.add(value)
    return True


def check_event(event: Event, lo: datetime, hi: datetime) -> list[str] | None:
    """Rules msgspec does not check itself: the timestamp window and character sets.
    `lo`/`hi` bound the accepted timestamps (400 days old .. 5 minutes ahead)."""
    accounts = _good_accounts
    if (
        lo <= event.timestamp <= hi
        and event.tenant_id in accounts
        and event.project_id in accounts
        and event.provider in _good_providers
        and not event.fallbacks
    ):
        return None
    errors: list[str] = []
    problem = timestamp_window_error(event.timestamp, lo, hi)
    if problem:
        errors.append(problem)
    if not _charset(accounts, _ACCOUNT_RE, event.tenant_id):
        errors.append(f"tenant_id: {_ACCOUNT_RULE}")
    if not _charset(accounts, _ACCOUNT_RE, event.project_id):
        errors.append(f"project_id: {_ACCOUNT_RULE}")
    if not _charset(_good_providers, _PROVIDER_RE, event.provider):
        errors.append(f"provider: {_PROVIDER_RULE}")
    for i, fallback in enumerate(event.fallbacks):
        if not _charset(_good_providers, _PROVIDER_RE, fallback.provider):
            errors.append(f"fallbacks[{i}].provider: {_PROVIDER_RULE}")
    return errors or None


def check_probe(probe: Probe, lo: datetime, hi: datetime) -> list[str] | None:
    errors: list[str] = []
    problem = timestamp_window_error(probe.timestamp, lo, hi)
    if problem:
        errors.append(problem)
    if not _charset(_good_providers, _PROVIDER_RE, probe.provider):
        errors.append(f"provider: {_PROVIDER_RULE}")
    return errors or None


_timestamp = attrgetter("timestamp")
_tenant = attrgetter("tenant_id")
_project = attrgetter("project_id")
_provider = attrgetter("provider")
_fallbacks = attrgetter("fallbacks")


def events_all_valid(events: list[Event], lo: datetime, hi: datetime) -> bool:
    """True when no event of the batch breaks a post-decode rule: one pass of C-level
    maps instead of a Python loop (False only means "check one by one")."""
    if not events:
        return True
    stamps = list(map(_timestamp, events))
    if min(stamps) < lo or max(stamps) > hi:
        return False
    accounts = _good_accounts
    if not (
        accounts.issuperset(map(_tenant, events))
        and accounts.issuperset(map(_project, events))
        and _good_providers.issuperset(map(_provider, events))
    ):
        return False
    fallbacks = chain.from_iterable(map(_fallbacks, events))
    return _good_providers.issuperset(map(_provider, fallbacks))


def probes_all_valid(probes: list[Probe], lo: datetime, hi: datetime) -> bool:
    return all(check_probe(probe, lo, hi) is None for probe in probes)


def window(now: datetime) -> tuple[datetime, datetime]:
    """The accepted timestamp range at `now`."""
    return now - MAX_AGE, now + MAX_FUTURE


def timestamp_window_error(ts: datetime, lo: datetime, hi: datetime) -> str | None:
    if ts > hi:
        return "timestamp: must not be more than 5 minutes in the future"
    if ts < lo:
        return "timestamp: must not be more than 400 days old"
    return None


def _check_fallback(errors: list[str], prefix: str, item: Any) -> None:
    if not isinstance(item, dict):
        errors.append(f"{prefix}: must be an object")
        return
    g = item.get
    _check_str(
        errors,
        f"{prefix}.provider",
        g("provider", _MISSING),
        required=True,
        min_len=1,
        max_len=64,
        pattern=_PROVIDER_RE,
        charset="[a-z0-9_-]",
    )
    _check_number(errors, f"{prefix}.latency_ms", g("latency_ms", _MISSING), required=True)
    _check_str(errors, f"{prefix}.model", g("model", _MISSING), required=False, max_len=128)
    _check_str(errors, f"{prefix}.region", g("region", _MISSING), required=False, max_len=64)
    _check_str(
        errors, f"{prefix}.error_type", g("error_type", _MISSING), required=False, max_len=64
    )
    _check_int(
        errors, f"{prefix}.http_status", g("http_status", _MISSING), required=False, ge=100, le=599
    )


def explain_event(item: Any) -> list[str]:
    """Every contract rule the raw (JSON-decoded) event breaks."""
    if not isinstance(item, dict):
        return ["event: must be a JSON object"]
    errors: list[str] = []
    g = item.get
    _check_str(errors, "event_id", g("event_id", _MISSING), required=True, min_len=1, max_len=128)
    _check_timestamp(errors, g("timestamp", _MISSING))
    for name in ("tenant_id", "project_id"):
        _check_str(
            errors,
            name,
            g(name, _MISSING),
            required=True,
            min_len=1,
            max_len=64,
            pattern=_ACCOUNT_RE,
            charset="[A-Za-z0-9_.:-]",
        )
    _check_str(errors, "api_key_id", g("api_key_id", _MISSING), required=False, max_len=64)
    _check_str(
        errors,
        "provider",
        g("provider", _MISSING),
        required=True,
        min_len=1,
        max_len=64,
        pattern=_PROVIDER_RE,
        charset="[a-z0-9_-]",
    )
    _check_str(errors, "model", g("model", _MISSING), required=True, min_len=1, max_len=128)
    region = g("region", _MISSING)
    if region is None:
        errors.append("region: must be a string")
    else:
        _check_str(errors, "region", region, required=False, max_len=64)
    status = g("status", _MISSING)
    if status is _MISSING:
        errors.append("status: required")
    elif status not in ("ok", "error"):
        errors.append('status: must be "ok" or "error"')
    _check_int(errors, "http_status", g("http_status", _MISSING), required=False, ge=100, le=599)
    _check_str(errors, "error_type", g("error_type", _MISSING), required=False, max_len=64)
    for name, required, ge, le in (
        ("queries", False, 1, MAX_QUERIES),
        ("documents", True, 0, 100_000),
        ("input_tokens", True, 0, MAX_TOKENS),
        ("output_tokens", False, 0, MAX_TOKENS),
    ):
        value = g(name, _MISSING)
        if value is None and not required:
            errors.append(f"{name}: must be an integer")
            continue
        _check_int(errors, name, value, required=required, ge=ge, le=le)
    _check_number(errors, "latency_ms", g("latency_ms", _MISSING), required=True)
    fallbacks = g("fallbacks", _MISSING)
    if fallbacks is not _MISSING:
        if not isinstance(fallbacks, list):
            errors.append("fallbacks: must be a list")
        else:
            for i, fb in enumerate(fallbacks):
                _check_fallback(errors, f"fallbacks[{i}]", fb)
    return errors


def explain_probe(item: Any) -> list[str]:
    """Every contract rule the raw (JSON-decoded) probe breaks."""
    if not isinstance(item, dict):
        return ["probe: must be a JSON object"]
    errors: list[str] = []
    g = item.get
    _check_str(errors, "probe_id", g("probe_id", _MISSING), required=True, min_len=1, max_len=128)
    _check_timestamp(errors, g("timestamp", _MISSING))
    _check_str(
        errors,
        "provider",
        g("provider", _MISSING),
        required=True,
        min_len=1,
        max_len=64,
        pattern=_PROVIDER_RE,
        charset="[a-z0-9_-]",
    )
    region = g("region", _MISSING)
    if region is None:
        errors.append("region: must be a string")
    else:
        _check_str(errors, "region", region, required=False, max_len=64)
    ok = g("ok", _MISSING)
    if ok is _MISSING:
        errors.append("ok: required")
    elif not isinstance(ok, bool):
        errors.append("ok: must be true or false")
    _check_number(errors, "latency_ms", g("latency_ms", _MISSING), required=True)
    _check_int(errors, "http_status", g("http_status", _MISSING), required=False, ge=100, le=599)
    _check_str(errors, "error", g("error", _MISSING), required=False, max_len=1024)
    return errors


# ---------------------------------------------------------------------------------------
# Batch decoding.

T = TypeVar("T", bound=msgspec.Struct)


class BodyError(ValueError):
    """The body as a whole is unusable (400)."""


class TooLarge(ValueError):
    """The body breaks a size limit (413)."""


@dataclass(slots=True)
class Rejected:
    index: int
    item_id: str | None
    errors: list[str]


@dataclass(slots=True)
class Decoded(Generic[T]):
    items: list[T]  # the valid items, in batch order
    rejected: list[Rejected]
    # The JSON array of exactly `items`, as sent, when every item was valid: the spool
    # can store these bytes instead of encoding the items again.
    raw: bytes | None = None


@dataclass(frozen=True, eq=False)
class StreamSchema(Generic[T]):
    """What differs between the event and the probe stream."""

    name: str  # "events" / "probes"
    envelope_key: str  # key of the list in a JSON body
    id_field: str
    item_type: type[T]
    explain: Callable[[Any], list[str]]
    check: Callable[[T, datetime, datetime], list[str] | None]
    all_valid: Callable[[list[T], datetime, datetime], bool]

    def item_id(self, item: T) -> str:
        return str(getattr(item, self.id_field))

    @cached_property
    def list_decoder(self) -> msgspec.json.Decoder[list[T]]:
        return msgspec.json.Decoder(list[self.item_type])  # type: ignore[name-defined]

    @cached_property
    def raw_envelope_decoder(self) -> msgspec.json.Decoder[Any]:
        envelope = msgspec.defstruct(
            f"{self.name.title()}RawBatch", [(self.envelope_key, msgspec.Raw)]
        )
        return msgspec.json.Decoder(envelope)

    @cached_property
    def envelope_decoder(self) -> msgspec.json.Decoder[Any]:
        envelope = msgspec.defstruct(
            f"{self.name.title()}Batch",
            [(self.envelope_key, list[self.item_type])],  # type: ignore[name-defined]
        )
        return msgspec.json.Decoder(envelope)


EVENTS: StreamSchema[Event] = StreamSchema(
    "events", "events", "event_id", Event, explain_event, check_event, events_all_valid
)
PROBES: StreamSchema[Probe] = StreamSchema(
    "probes", "probes", "probe_id", Probe, explain_probe, check_probe, probes_all_valid
)

_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_any = msgspec.json.Decoder()


def _split_json_body(schema: StreamSchema[Any], body: bytes) -> list[msgspec.Raw]:
    try:
        doc = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    except msgspec.ValidationError:
        raise BodyError(f'body: must be a JSON object {{"{schema.envelope_key}": [...]}}') from None
    except msgspec.DecodeError as exc:
        raise BodyError(f"body: not valid JSON ({exc})") from None
    raw = doc.get(schema.envelope_key)
    if raw is None:
        raise BodyError(f'body: missing "{schema.envelope_key}" (a list)')
    try:
        return _raw_list.decode(raw)
    except msgspec.ValidationError:
        raise BodyError(f"{schema.envelope_key}: must be a list") from None


def _split_ndjson(body: bytes) -> list[bytes]:
    return [line for line in body.split(b"\n") if line.strip()]


def decode_batch(
    schema: StreamSchema[T], body: bytes, *, ndjson: bool, now: datetime | None = None
) -> Decoded[T]:
    """Decode a request body into valid items and rejected ones, in batch order."""
    if len(body) > MAX_BODY_BYTES:
        raise TooLarge(f"body: must be at most {MAX_BODY_BYTES} bytes")
    now = now or datetime.now(UTC)
    typed: list[T] | None = None
    raws: list[bytes] | list[msgspec.Raw] | None = None
    array: bytes | None = None
    try:
        if ndjson:
            raws = _split_ndjson(body)
            array = b"[" + b",".join(raws) + b"]"
            typed = schema.list_decoder.decode(array)
            if len(typed) != len(raws):  # a line held more than one value: not NDJSON
                typed = None
        else:
            typed = getattr(schema.envelope_decoder.decode(body), schema.envelope_key)
    except (msgspec.ValidationError, msgspec.DecodeError):
        typed = None
    if typed is None:
        return _decode_one_by_one(schema, body, raws, now)
    if len(typed) > MAX_BATCH_EVENTS:
        raise TooLarge(f"{schema.envelope_key}: at most {MAX_BATCH_EVENTS} per request")
    lo, hi = window(now)
    if schema.all_valid(typed, lo, hi):
        if array is None:
            # The list's bytes exactly as sent (a scan, no objects built).
            array = bytes(getattr(schema.raw_envelope_decoder.decode(body), schema.envelope_key))
        return Decoded(typed, [], array)
    items: list[T] = []
    rejected: list[Rejected] = []
    check = schema.check
    for index, item in enumerate(typed):
        problems = check(item, lo, hi)
        if problems:
            rejected.append(Rejected(index, schema.item_id(item), problems))
        else:
            items.append(item)
    return Decoded(items, rejected)


def _decode_one_by_one(
    schema: StreamSchema[T],
    body: bytes,
    raws: list[bytes] | list[msgspec.Raw] | None,
    now: datetime,
) -> Decoded[T]:
    """Slow path: the batch holds at least one invalid item (or is not usable at all)."""
    if raws is None:
        raws = _split_json_body(schema, body)
    elif raws and all(_not_json(line) for line in raws):
        raise BodyError("body: not valid NDJSON (one JSON object per line)")
    if len(raws) > MAX_BATCH_EVENTS:
        raise TooLarge(f"{schema.envelope_key}: at most {MAX_BATCH_EVENTS} per request")
    items: list[T] = []
    rejected: list[Rejected] = []
    decoder = msgspec.json.Decoder(schema.item_type)
    lo, hi = window(now)
    for index, raw in enumerate(raws):
        try:
            item = decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            rejected.append(_explain(schema, raw, exc, index))
            continue
        problems = schema.check(item, lo, hi)
        if problems:
            rejected.append(Rejected(index, schema.item_id(item), problems))
        else:
            items.append(item)
    return Decoded(items, rejected)


def _not_json(line: bytes | msgspec.Raw) -> bool:
    try:
        _any.decode(line)
    except msgspec.DecodeError:
        return True
    return False


def _explain(
    schema: StreamSchema[Any], raw: bytes | msgspec.Raw, exc: Exception, index: int
) -> Rejected:
    try:
        doc = _any.decode(raw)
    except msgspec.DecodeError as decode_error:
        return Rejected(index, None, [f"{schema.name[:-1]}: not valid JSON ({decode_error})"])
    item_id = doc.get(schema.id_field) if isinstance(doc, dict) else None
    errors = schema.explain(doc) or [f"{schema.name[:-1]}: {exc}"]
    return Rejected(index, item_id if isinstance(item_id, str) else None, errors)
