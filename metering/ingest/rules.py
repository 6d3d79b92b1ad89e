"""Rules msgspec does not check itself, and the wording of every broken rule.

`check_*` apply the timestamp window and the character sets to decoded items;
`explain_*` word every rule a raw (JSON-decoded) item breaks as "field: rule". msgspec
alone decides validity; the explainers only word it, so the fast and the slow path of
`decode.py` cannot disagree on what is accepted.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from itertools import chain
from operator import attrgetter
from typing import Any

import msgspec

from metering.ingest.structs import (
    ACCOUNT_PATTERN,
    MAX_AGE,
    MAX_FALLBACKS,
    MAX_FUTURE,
    MAX_LATENCY_MS,
    MAX_QUERIES,
    MAX_TOKENS,
    PROVIDER_PATTERN,
    Event,
    Probe,
)

_ACCOUNT_RE = re.compile(ACCOUNT_PATTERN)
_PROVIDER_RE = re.compile(PROVIDER_PATTERN)
_MISSING = object()
# At most this many reasons are listed per rejected item (the first ones found).
MAX_ITEM_ERRORS = 20
LATENCY_RULE = f"must be <= {MAX_LATENCY_MS} (one day)"
FALLBACKS_RULE = f"fallbacks: at most {MAX_FALLBACKS} per event"
# RFC 3339 allows a leap second (ss = 60). It is stored as hh:mm:59.999 so the event stays
# in its own minute, day and month.
_LEAP = re.compile(r"^(\d{4}-\d\d-\d\d[Tt]\d\d:\d\d):60(?:\.\d+)?([Zz]|[+-]\d\d:\d\d)\Z")
_datetime = msgspec.json.Decoder(datetime)


def leap_second(value: str) -> str | None:
    """`value` with a leap second (:60) moved to :59.999, or None if it has none."""
    match = _LEAP.match(value)
    return f"{match[1]}:59.999{match[2]}" if match else None


def parse_timestamp(value: str) -> datetime | None:
    """An RFC 3339 timestamp (leap seconds included), or None if `value` is not one."""
    text = leap_second(value) or value
    try:
        return _datetime.decode(msgspec.json.encode(text))
    except msgspec.ValidationError:
        return None


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


def _check_latency(errors: list[str], name: str, value: Any) -> None:
    if value is _MISSING:
        errors.append(f"{name}: required")
    elif not _is_number(value):
        errors.append(f"{name}: must be a number")
    elif value < 0:
        errors.append(f"{name}: must be >= 0")
    elif value > MAX_LATENCY_MS:
        errors.append(f"{name}: {LATENCY_RULE}")


def _check_timestamp(errors: list[str], value: Any) -> None:
    if value is _MISSING:
        errors.append("timestamp: required")
        return
    if not isinstance(value, str):
        errors.append("timestamp: must be an RFC 3339 string with a UTC offset")
        return
    parsed = parse_timestamp(value)
    if parsed is None:
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
    _check_latency(errors, f"{prefix}.latency_ms", g("latency_ms", _MISSING))
    _check_str(errors, f"{prefix}.model", g("model", _MISSING), required=False, max_len=128)
    _check_str(errors, f"{prefix}.region", g("region", _MISSING), required=False, max_len=64)
    _check_str(
        errors, f"{prefix}.error_type", g("error_type", _MISSING), required=False, max_len=64
    )
    _check_int(
        errors, f"{prefix}.http_status", g("http_status", _MISSING), required=False, ge=100, le=599
    )


def explain_event(item: Any) -> list[str]:
    """Every contract rule the raw (JSON-decoded) event breaks (the first
    MAX_ITEM_ERRORS of them)."""
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
    _check_latency(errors, "latency_ms", g("latency_ms", _MISSING))
    fallbacks = g("fallbacks", _MISSING)
    if fallbacks is not _MISSING:
        if not isinstance(fallbacks, list):
            errors.append("fallbacks: must be a list")
        else:
            # decode.py hands over at most MAX_FALLBACKS + 1 attempts (enough to tell
            # that there are too many); only the first MAX_FALLBACKS are explained.
            if len(fallbacks) > MAX_FALLBACKS:
                errors.append(FALLBACKS_RULE)
            for i, fb in enumerate(fallbacks[:MAX_FALLBACKS]):
                _check_fallback(errors, f"fallbacks[{i}]", fb)
    return errors[:MAX_ITEM_ERRORS]


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
    _check_latency(errors, "latency_ms", g("latency_ms", _MISSING))
    _check_int(errors, "http_status", g("http_status", _MISSING), required=False, ge=100, le=599)
    _check_str(errors, "error", g("error", _MISSING), required=False, max_len=1024)
    return errors[:MAX_ITEM_ERRORS]
