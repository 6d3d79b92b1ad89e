"""Rules msgspec does not check itself, and the wording of every broken rule.

`check_*` apply the timestamp window and the character sets to decoded items;
`explain_*` word every rule a raw (JSON-decoded) item breaks as "field: rule". msgspec
alone decides validity; the explainers only word it, so the fast and the slow path of
`decode.py` cannot disagree on what is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
_ACCOUNT_CHARSET = "[A-Za-z0-9_.:-]"  # ACCOUNT_PATTERN's characters, as the errors word them
_PROVIDER_CHARSET = "[a-z0-9_-]"  # PROVIDER_PATTERN's
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


# ---------------------------------------------------------------------------------------
# Checking decoded items: what msgspec does not check itself.

_ACCOUNT_RULE = f"must contain only {_ACCOUNT_CHARSET}"
_PROVIDER_RULE = f"must contain only {_PROVIDER_CHARSET}"
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


# ---------------------------------------------------------------------------------------
# Explaining: one rule per field, shared by events, probes and fallbacks.

# A rule words what is wrong with one field's raw value (`_MISSING` when the key is
# absent) as "name: rule" into `errors`.
_Rule = Callable[[list[str], str, Any], None]
_Fields = tuple[tuple[str, _Rule], ...]


def _absent(errors: list[str], name: str, value: Any, *, required: bool, nullable: bool) -> bool:
    """Whether `value` counts as absent (a missing key, or null where `nullable`); an
    absent required field is noted."""
    if value is _MISSING or (value is None and nullable):
        if required:
            errors.append(f"{name}: required")
        return True
    return False


def _string(
    *,
    required: bool = False,
    nullable: bool = False,
    min_len: int = 0,
    max_len: int,
    pattern: re.Pattern[str] | None = None,
    charset: str = "",
) -> _Rule:
    """A string field; `nullable`: an optional field whose null counts as absent."""

    def rule(errors: list[str], name: str, value: Any) -> None:
        if _absent(errors, name, value, required=required, nullable=nullable):
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

    return rule


def _integer(
    *, required: bool = False, nullable: bool = False, ge: int | None = None, le: int | None = None
) -> _Rule:
    """An integer field (not a bool); `nullable` as for `_string`."""

    def rule(errors: list[str], name: str, value: Any) -> None:
        if _absent(errors, name, value, required=required, nullable=nullable):
            return
        if not _is_int(value):
            errors.append(f"{name}: must be an integer")
            return
        if ge is not None and value < ge:
            errors.append(f"{name}: must be >= {ge}")
        if le is not None and value > le:
            errors.append(f"{name}: must be <= {le}")

    return rule


def _latency(errors: list[str], name: str, value: Any) -> None:
    if value is _MISSING:
        errors.append(f"{name}: required")
    elif not _is_number(value):
        errors.append(f"{name}: must be a number")
    elif value < 0:
        errors.append(f"{name}: must be >= 0")
    elif value > MAX_LATENCY_MS:
        errors.append(f"{name}: {LATENCY_RULE}")


def _timestamp_rule(errors: list[str], name: str, value: Any) -> None:
    if value is _MISSING:
        errors.append(f"{name}: required")
        return
    if not isinstance(value, str):
        errors.append(f"{name}: must be an RFC 3339 string with a UTC offset")
        return
    parsed = parse_timestamp(value)
    if parsed is None:
        errors.append(f"{name}: must be an RFC 3339 timestamp, e.g. 2026-11-27T10:00:00Z")
        return
    if parsed.tzinfo is None:
        errors.append(f"{name}: must include a UTC offset (Z or +hh:mm)")
        return
    window_error = timestamp_window_error(parsed, *window(datetime.now(UTC)))
    if window_error:
        errors.append(window_error)


def _status(errors: list[str], name: str, value: Any) -> None:
    if value is _MISSING:
        errors.append(f"{name}: required")
    elif value not in ("ok", "error"):
        errors.append(f'{name}: must be "ok" or "error"')


def _boolean(errors: list[str], name: str, value: Any) -> None:
    if value is _MISSING:
        errors.append(f"{name}: required")
    elif not isinstance(value, bool):
        errors.append(f"{name}: must be true or false")


def _check_fields(errors: list[str], prefix: str, item: dict[str, Any], fields: _Fields) -> None:
    """Every rule of `fields`, in order, on `item`'s values (names prefixed by `prefix`)."""
    get = item.get
    for name, rule in fields:
        rule(errors, prefix + name, get(name, _MISSING))


def _fallbacks_rule(errors: list[str], name: str, value: Any) -> None:
    if value is _MISSING:
        return
    if not isinstance(value, list):
        errors.append(f"{name}: must be a list")
        return
    # decode.py hands over at most MAX_FALLBACKS + 1 attempts (enough to tell that there
    # are too many); only the first MAX_FALLBACKS are explained.
    if len(value) > MAX_FALLBACKS:
        errors.append(FALLBACKS_RULE)
    for i, fallback in enumerate(value[:MAX_FALLBACKS]):
        if isinstance(fallback, dict):
            _check_fields(errors, f"{name}[{i}].", fallback, _FALLBACK_FIELDS)
        else:
            errors.append(f"{name}[{i}]: must be an object")


# The fields' rules in the order their errors are listed; they mirror structs.py
# (`nullable` where the struct says `| None`).
_ID = _string(required=True, min_len=1, max_len=128)
_ACCOUNT = _string(
    required=True, min_len=1, max_len=64, pattern=_ACCOUNT_RE, charset=_ACCOUNT_CHARSET
)
_PROVIDER = _string(
    required=True, min_len=1, max_len=64, pattern=_PROVIDER_RE, charset=_PROVIDER_CHARSET
)
_SHORT = _string(nullable=True, max_len=64)
_HTTP_STATUS = _integer(nullable=True, ge=100, le=599)
_FALLBACK_FIELDS: _Fields = (
    ("provider", _PROVIDER),
    ("latency_ms", _latency),
    ("model", _string(nullable=True, max_len=128)),
    ("region", _SHORT),
    ("error_type", _SHORT),
    ("http_status", _HTTP_STATUS),
)
_EVENT_FIELDS: _Fields = (
    ("event_id", _ID),
    ("timestamp", _timestamp_rule),
    ("tenant_id", _ACCOUNT),
    ("project_id", _ACCOUNT),
    ("api_key_id", _SHORT),
    ("provider", _PROVIDER),
    ("model", _string(required=True, min_len=1, max_len=128)),
    ("region", _string(max_len=64)),
    ("status", _status),
    ("http_status", _HTTP_STATUS),
    ("error_type", _SHORT),
    ("queries", _integer(ge=1, le=MAX_QUERIES)),
    ("documents", _integer(required=True, ge=0, le=100_000)),
    ("input_tokens", _integer(required=True, ge=0, le=MAX_TOKENS)),
    ("output_tokens", _integer(ge=0, le=MAX_TOKENS)),
    ("latency_ms", _latency),
    ("fallbacks", _fallbacks_rule),
)
_PROBE_FIELDS: _Fields = (
    ("probe_id", _ID),
    ("timestamp", _timestamp_rule),
    ("provider", _PROVIDER),
    ("region", _string(max_len=64)),
    ("ok", _boolean),
    ("latency_ms", _latency),
    ("http_status", _HTTP_STATUS),
    ("error", _string(nullable=True, max_len=1024)),
)


def _explain(what: str, fields: _Fields, item: Any) -> list[str]:
    if not isinstance(item, dict):
        return [f"{what}: must be a JSON object"]
    errors: list[str] = []
    _check_fields(errors, "", item, fields)
    return errors[:MAX_ITEM_ERRORS]


def explain_event(item: Any) -> list[str]:
    """Every contract rule the raw (JSON-decoded) event breaks (the first
    MAX_ITEM_ERRORS of them)."""
    return _explain("event", _EVENT_FIELDS, item)


def explain_probe(item: Any) -> list[str]:
    """Every contract rule the raw (JSON-decoded) probe breaks (the first
    MAX_ITEM_ERRORS of them)."""
    return _explain("probe", _PROBE_FIELDS, item)
