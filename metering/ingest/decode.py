"""Batch decoding: a request body into valid items and rejected ones with reasons.

Hot path (`decode_fast`, run on the event loop for bodies up to INLINE_MAX_BYTES): one
typed msgspec decode of the whole batch. Anything else (`decode_batch`, run by the
routes in a small thread pool) works so that no single C call over an adversarial body
runs long, because msgspec holds the GIL for a whole call and the event loop waits on it:

- the body is split into items by scans that build no objects (msgspec.Raw), and an
  array_like Struct with forbid_unknown_fields stops the split at the 10,001st item
  instead of after building millions of them; NDJSON is split in 256 KiB slices;
- items are typed-decoded in groups of about GROUP_BYTES, so each call is bounded by
  bytes, not by what the bytes hold; an item larger than that has its fallbacks counted
  first (again stopping at the 17th), so millions of attempts cost a scan only;
- an invalid item is explained from a Struct whose fields are all Raw: values are
  decoded one by one, containers where a scalar belongs are never built, fallbacks are
  looked at up to the 17th.

Reasons are bounded: MAX_ITEM_ERRORS per item; once MAX_BATCH_REASONS are listed in a
batch, later rejected items carry their first reason only. Every rejected item is
still listed with its index.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from itertools import compress
from typing import Any, Generic, TypeVar

import msgspec

from metering.ingest.rules import (
    check_event,
    check_probe,
    events_all_valid,
    explain_event,
    explain_probe,
    leap_second,
    probes_all_valid,
    window,
)
from metering.ingest.structs import (
    MAX_BATCH_EVENTS,
    MAX_BODY_BYTES,
    MAX_FALLBACKS,
    Event,
    Fallback,
    Probe,
)

T = TypeVar("T", bound=msgspec.Struct)

INLINE_MAX_BYTES = 1024 * 1024  # bodies decoded on the event loop when fully valid
GROUP_BYTES = 256 * 1024  # items typed-decoded together in one call
# An event with its fallbacks is at most 17 JSON objects: a body with more than twice
# 10,000 x 17 "{" cannot be a batch (short of braces inside strings on every event).
# Counting them is a memchr-speed pass that turns millions of `{}` into a 413 at once.
MAX_BRACES = 2 * MAX_BATCH_EVENTS * (1 + MAX_FALLBACKS)
NDJSON_SLICE = 256 * 1024  # NDJSON split in slices of about this size
MAX_BATCH_REASONS = 1_000  # reasons listed in full per batch; then first reasons only
# Off the loop, the decode thread sleeps this long after each group and every PAUSE_EVERY
# items it explains: a thread that keeps the GIL busy with Python code hands it over only
# every 5 ms (the switch interval), and a /healthz answer needs the GIL several times.
PAUSE_SECONDS = 0.0005
PAUSE_EVERY = 32

_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)
_NESTED = "JSON nested too deeply (at most 1000 levels)"
_UTF8 = "not valid UTF-8 inside a string"


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
    # Each item's JSON, in step with `items` (the bytes as sent, or the item encoded
    # again when a value was rewritten), when the body was split item by item: a batch
    # with rejected items or duplicates is stored without encoding its items again.
    raws: Sequence[bytes | msgspec.Raw] | None = None

    def array(self, keep: Sequence[bool] | None = None) -> bytes | None:
        """The JSON array of the items (those whose `keep` is true), without encoding
        them; None when their bytes are not known (the caller encodes the items)."""
        if keep is None and self.raw is not None:
            return self.raw
        if self.raws is None:
            return None
        raws = list(self.raws if keep is None else compress(self.raws, keep))
        if len(raws) < 2:
            return b"[" + b"".join(raws) + b"]"
        # One copy of the bytes (a 10 MB batch is copied once, not twice).
        raws[0] = b"[" + raws[0]
        raws[-1] = bytes(raws[-1]) + b"]"
        return b",".join(raws)


def _bounded_array(name: str, size: int, *, strict: bool) -> msgspec.json.Decoder[Any]:
    """A decoder of a JSON array into at most `size` Raw elements. Strict: more elements
    fail at the first extra one (msgspec's max_length is checked only after the list is
    built); lenient: extra elements are skipped by a scan."""
    fields = [(f"i{k}", msgspec.Raw, None) for k in range(size)]
    struct = msgspec.defstruct(name, fields, array_like=True, forbid_unknown_fields=strict)
    return msgspec.json.Decoder(struct)


def _elements(array: msgspec.Struct) -> list[msgspec.Raw]:
    values = msgspec.structs.astuple(array)
    try:
        return list(values[: values.index(None)])
    except ValueError:
        return list(values)


def _raw_shape(name: str, struct: type[msgspec.Struct]) -> msgspec.json.Decoder[Any]:
    """A decoder of an item's known fields as Raw (absent: empty Raw); unknown keys and
    the values' insides are skipped by a scan."""
    fields = [(field, msgspec.Raw, msgspec.Raw()) for field in struct.__struct_fields__]
    return msgspec.json.Decoder(msgspec.defstruct(name, fields))


_items_split = _bounded_array("BatchItems", MAX_BATCH_EVENTS, strict=True)
_attempts_strict = _bounded_array("Attempts", MAX_FALLBACKS, strict=True)
_attempts_lenient = _bounded_array("AttemptsPeek", MAX_FALLBACKS + 1, strict=False)
_fallback_shape = _raw_shape("FallbackShape", Fallback)
_any = msgspec.json.Decoder()


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

    @property
    def kind(self) -> str:
        return self.name[:-1]

    def item_id(self, item: T) -> str:
        return str(getattr(item, self.id_field))

    @cached_property
    def list_decoder(self) -> msgspec.json.Decoder[list[T]]:
        return msgspec.json.Decoder(list[self.item_type])  # type: ignore[name-defined]

    @cached_property
    def item_decoder(self) -> msgspec.json.Decoder[T]:
        return msgspec.json.Decoder(self.item_type)

    @cached_property
    def raw_envelope_decoder(self) -> msgspec.json.Decoder[Any]:
        envelope = msgspec.defstruct(
            f"{self.name.title()}RawBatch", [(self.envelope_key, msgspec.Raw)]
        )
        return msgspec.json.Decoder(envelope)

    @cached_property
    def split_decoder(self) -> msgspec.json.Decoder[Any]:
        """The envelope with its list as at most MAX_BATCH_EVENTS Raw items: one scan."""
        envelope = msgspec.defstruct(
            f"{self.name.title()}SplitBatch", [(self.envelope_key, _items_split.type)]
        )
        return msgspec.json.Decoder(envelope)

    @cached_property
    def envelope_decoder(self) -> msgspec.json.Decoder[Any]:
        envelope = msgspec.defstruct(
            f"{self.name.title()}Batch",
            [(self.envelope_key, list[self.item_type])],  # type: ignore[name-defined]
        )
        return msgspec.json.Decoder(envelope)

    @cached_property
    def shape_decoder(self) -> msgspec.json.Decoder[Any]:
        return _raw_shape(f"{self.item_type.__name__}Shape", self.item_type)

    @cached_property
    def has_fallbacks(self) -> bool:
        return "fallbacks" in self.item_type.__struct_fields__

    @cached_property
    def attempts_decoder(self) -> msgspec.json.Decoder[Any]:
        """The item's fallbacks only, failing at the 17th (None when absent)."""
        attempts = _attempts_strict.type
        struct = msgspec.defstruct("ItemAttempts", [("fallbacks", attempts | None, None)])
        return msgspec.json.Decoder(struct)

    @cached_property
    def leap_decoder(self) -> msgspec.json.Decoder[Any]:
        """The item with its timestamp as a string (for leap seconds)."""
        leap = msgspec.defstruct(
            f"{self.item_type.__name__}LeapSecond", [("timestamp", str)], bases=(self.item_type,)
        )
        return msgspec.json.Decoder(leap)


EVENTS: StreamSchema[Event] = StreamSchema(
    "events", "events", "event_id", Event, explain_event, check_event, events_all_valid
)
PROBES: StreamSchema[Probe] = StreamSchema(
    "probes", "probes", "probe_id", Probe, explain_probe, check_probe, probes_all_valid
)


# -- the fast path ------------------------------------------------------------------------


def decode_fast(
    schema: StreamSchema[T], body: bytes, *, ndjson: bool, now: datetime | None = None
) -> Decoded[T] | None:
    """A small, fully valid batch in one typed decode (cheap enough for the event loop).
    None: the body is large or holds an invalid item; use `decode_batch`."""
    if len(body) > INLINE_MAX_BYTES:
        return None
    array: bytes | None = None
    try:
        if ndjson:
            if body.count(b"\n") > 2 * MAX_BATCH_EVENTS:
                return None
            lines = [line for line in body.split(b"\n") if line.strip()]
            if len(lines) > MAX_BATCH_EVENTS:
                raise TooLarge(f"{schema.envelope_key}: at most {MAX_BATCH_EVENTS} per request")
            array = b"[" + b",".join(lines) + b"]"
            typed = schema.list_decoder.decode(array)
            if len(typed) != len(lines):  # a line held more than one value: not NDJSON
                return None
        else:
            typed = getattr(schema.envelope_decoder.decode(body), schema.envelope_key)
    except _DECODE_ERRORS:
        return None
    if len(typed) > MAX_BATCH_EVENTS:
        raise TooLarge(f"{schema.envelope_key}: at most {MAX_BATCH_EVENTS} per request")
    lo, hi = window(now or datetime.now(UTC))
    if not schema.all_valid(typed, lo, hi):
        return _checked(schema, typed, range(len(typed)), [], lo, hi)
    if array is None:
        # The list's bytes exactly as sent (a scan, no objects built).
        array = bytes(getattr(schema.raw_envelope_decoder.decode(body), schema.envelope_key))
    return Decoded(typed, [], array)


# -- the general path ---------------------------------------------------------------------


def decode_batch(
    schema: StreamSchema[T],
    body: bytes,
    *,
    ndjson: bool,
    now: datetime | None = None,
    fast: bool = True,
    pause: bool = False,
) -> Decoded[T]:
    """Decode a request body into valid items and rejected ones, in batch order.
    Bounded work per call whatever the body (see the module docstring); `fast=False`
    when the caller already tried `decode_fast`; `pause=True` in a worker thread, to let
    the event loop run between steps."""
    if len(body) > MAX_BODY_BYTES:
        raise TooLarge(f"body: must be at most {MAX_BODY_BYTES} bytes (16 MiB)")
    now = now or datetime.now(UTC)
    if fast:
        decoded = decode_fast(schema, body, ndjson=ndjson, now=now)
        if decoded is not None:
            return decoded
    if body.count(b"{") > MAX_BRACES:
        raise TooLarge(
            f'body: at most {MAX_BRACES} "{{" per request (an event with its fallbacks is'
            f" 17 JSON objects, {MAX_BATCH_EVENTS} events at most)"
        )
    raws: Sequence[bytes | msgspec.Raw] = (
        split_ndjson(schema, body) if ndjson else split_json(schema, body)
    )
    typed, indices, item_raws, rejected, unusable, rewritten = _decode_items(schema, raws, pause)
    if ndjson and raws and unusable == len(raws):
        reason = rejected[0].errors[0].partition(": ")[2]
        raise BodyError(f"body: not valid NDJSON (one JSON object per line): {reason}")
    lo, hi = window(now)
    if not rejected and not rewritten and schema.all_valid(typed, lo, hi):
        # The array is joined only if the spool needs it (not for a batch of retries).
        return Decoded(typed, [], None, raws)
    return _checked(schema, typed, indices, rejected, lo, hi, item_raws)


def split_json(schema: StreamSchema[Any], body: bytes) -> list[msgspec.Raw]:
    """The items of `{"<key>": [...]}` as Raw, without building them."""
    key = schema.envelope_key
    try:
        return _elements(getattr(schema.split_decoder.decode(body), key))
    except msgspec.ValidationError as exc:
        message = str(exc)
    except msgspec.DecodeError as exc:
        raise BodyError(f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise BodyError(f"body: {_NESTED}") from None
    except UnicodeDecodeError:
        raise BodyError(f"body: {_UTF8}") from None
    if "missing required field" in message:
        raise BodyError(f'body: missing "{key}" (a list)')
    if "at most length" in message:
        raise TooLarge(f"{key}: at most {MAX_BATCH_EVENTS} per request")
    if f"`$.{key}`" in message:
        raise BodyError(f"{key}: must be a list")
    raise BodyError(f'body: must be a JSON object {{"{key}": [...]}}')


def split_ndjson(schema: StreamSchema[Any], body: bytes) -> list[bytes]:
    """The non-blank lines of an NDJSON body, split in slices so that no call is long;
    more than MAX_BATCH_EVENTS of them is 413 as soon as it is known."""
    lines: list[bytes] = []
    start, size = 0, len(body)
    while start < size:
        end = body.find(b"\n", start + NDJSON_SLICE)
        end = size if end < 0 else end
        part = body[start:end]
        start = end + 1
        if not part.strip():
            continue
        lines.extend(filter(bytes.strip, part.split(b"\n")))
        if len(lines) > MAX_BATCH_EVENTS:
            raise TooLarge(f"{schema.envelope_key}: at most {MAX_BATCH_EVENTS} per request")
    return lines


def _groups(raws: Sequence[bytes | msgspec.Raw]) -> list[tuple[int, int]]:
    """Consecutive index ranges of about GROUP_BYTES each (a larger item alone)."""
    groups: list[tuple[int, int]] = []
    start, size = 0, 0
    for index, raw in enumerate(raws):
        length = len(raw)
        if index > start and size + length > GROUP_BYTES:
            groups.append((start, index))
            start, size = index, 0
        size += length
    if start < len(raws):
        groups.append((start, len(raws)))
    return groups


def _decode_items(
    schema: StreamSchema[T], raws: Sequence[bytes | msgspec.Raw], pause: bool = False
) -> tuple[list[T], list[int], list[bytes | msgspec.Raw], list[Rejected], int, bool]:
    """Typed items with their batch indices and JSON, rejected items, how many items
    were not usable JSON at all, and whether an item was decoded alone (its value may
    have been rewritten: a leap second), so the whole body as sent must not be stored."""
    typed: list[T] = []
    indices: list[int] = []
    item_raws: list[bytes | msgspec.Raw] = []
    rejected: list[Rejected] = []
    unusable = 0
    reasons = 0
    rewritten = False
    sleep = time.sleep if pause else _no_sleep
    for start, end in _groups(raws):
        sleep(PAUSE_SECONDS)
        group = raws[start:end]
        if end - start == 1 and len(group[0]) > GROUP_BYTES and not _few_attempts(schema, group[0]):
            decoded = None
        else:
            try:
                decoded = schema.list_decoder.decode(b"[" + b",".join(group) + b"]")
            except _DECODE_ERRORS:
                decoded = None
        if decoded is not None and len(decoded) == end - start:
            typed.extend(decoded)
            indices.extend(range(start, end))
            item_raws.extend(group)
            continue
        for index in range(start, end):
            if index % PAUSE_EVERY == 0:
                sleep(PAUSE_SECONDS)
            item, fixed, item_id, errors, bad_json = _decode_one(schema, raws[index])
            if item is not None:
                typed.append(item)
                indices.append(index)
                item_raws.append(msgspec.json.encode(item) if fixed else raws[index])
                rewritten = True  # valid alone, not in its group: a leap second
                continue
            unusable += bad_json
            if reasons >= MAX_BATCH_REASONS:
                errors = errors[:1]
            reasons += len(errors)
            rejected.append(Rejected(index, item_id, errors))
    return typed, indices, item_raws, rejected, unusable, rewritten


def _no_sleep(_: float) -> None:
    return None


def _few_attempts(schema: StreamSchema[Any], raw: bytes | msgspec.Raw) -> bool:
    """False when a large item surely is invalid for its fallbacks (more than 16, or not
    a list), found by a scan that stops at the 17th: decoding it typed would first build
    every attempt."""
    if not schema.has_fallbacks:
        return True
    try:
        schema.attempts_decoder.decode(raw)
    except _DECODE_ERRORS:
        return False
    return True


def _decode_one(
    schema: StreamSchema[T], raw: bytes | msgspec.Raw
) -> tuple[T | None, bool, str | None, list[str], bool]:
    """(item, whether a value was rewritten, None, [], False) when valid; else (None,
    False, its id, reasons, whether it was not usable JSON at all)."""
    # Only the message is kept: an exception bound past its except block would tie a
    # reference cycle (traceback -> frame -> exception) per item, and 10,000 of them made
    # the cyclic GC run 100 ms passes holding the GIL, which stalls the event loop.
    message: str
    if len(raw) <= GROUP_BYTES or _few_attempts(schema, raw):
        try:
            return schema.item_decoder.decode(raw), False, None, [], False
        except msgspec.ValidationError as exc:
            message = str(exc)
        except _DECODE_ERRORS as exc:
            message = str(exc)
        if "`$.timestamp`" in message:
            item = _with_leap_second(schema, raw)
            if item is not None:
                return item, True, None, [], False
    else:
        message = "invalid"
    item_id, errors, bad_json = _explain(schema, raw, message)
    return None, False, item_id, errors, bad_json


def _with_leap_second(schema: StreamSchema[T], raw: bytes | msgspec.Raw) -> T | None:
    """The item, if its only flaw was a leap second (23:59:60), at hh:mm:59.999."""
    try:
        loose = schema.leap_decoder.decode(raw)
    except _DECODE_ERRORS:
        return None
    fixed = leap_second(loose.timestamp)
    if fixed is None:
        return None
    try:
        timestamp = msgspec.json.decode(msgspec.json.encode(fixed), type=datetime)
    except msgspec.ValidationError:
        return None
    if timestamp.tzinfo is None:
        return None
    fields = msgspec.structs.asdict(loose)
    fields["timestamp"] = timestamp
    return schema.item_type(**fields)


# -- explanations -------------------------------------------------------------------------


def _explain(
    schema: StreamSchema[Any], raw: bytes | msgspec.Raw, message: str
) -> tuple[str | None, list[str], bool]:
    """(item id, reasons, not usable JSON) for an item msgspec refused."""
    kind = schema.kind
    try:
        shape = schema.shape_decoder.decode(raw)
        doc = {
            name: _value(value)
            for name in schema.item_type.__struct_fields__
            if name != "fallbacks" and (value := getattr(shape, name))
        }
        if schema.has_fallbacks and (attempts := shape.fallbacks):
            doc["fallbacks"] = _attempts(attempts)
    except msgspec.ValidationError:
        return None, [f"{kind}: must be a JSON object"], False
    except msgspec.DecodeError as decode_error:
        return None, [f"{kind}: not valid JSON ({decode_error})"], True
    except RecursionError:
        return None, [f"{kind}: {_NESTED}"], True
    except UnicodeDecodeError:
        return None, [f"{kind}: {_UTF8}"], True
    item_id = doc.get(schema.id_field)
    errors = schema.explain(doc) or [f"{kind}: {message}"]
    return (item_id if isinstance(item_id, str) else None), errors, False


_PLACEHOLDERS: dict[int, Any] = {ord("["): [], ord("{"): {}}


def _value(raw: msgspec.Raw) -> Any:
    """A field's value for the explainer: scalars decoded, a container where a scalar
    belongs replaced by an empty one of its kind (it is wrong whatever it holds)."""
    placeholder = _PLACEHOLDERS.get(memoryview(raw)[0] if len(raw) else 0)
    if placeholder is not None:
        return type(placeholder)()
    return _any.decode(raw)


def _attempts(raw: msgspec.Raw) -> Any:
    """The first MAX_FALLBACKS + 1 attempts, each with its fields as `_value`s."""
    try:
        elements = _elements(_attempts_lenient.decode(raw))
    except msgspec.ValidationError:
        return _value(raw)  # not a list
    attempts: list[Any] = []
    for element in elements:
        if memoryview(element)[0] == ord("{"):
            shape = _fallback_shape.decode(element)
            attempts.append(
                {
                    name: _value(value)
                    for name in Fallback.__struct_fields__
                    if (value := getattr(shape, name))
                }
            )
        else:
            attempts.append(_value(element))
    return attempts


def _checked(
    schema: StreamSchema[T],
    typed: list[T],
    indices: Sequence[int],
    rejected: list[Rejected],
    lo: datetime,
    hi: datetime,
    raws: Sequence[bytes | msgspec.Raw] | None = None,
) -> Decoded[T]:
    """Apply the rules msgspec does not check to typed items; merge with `rejected`.
    `raws`: the items' JSON, in step with `typed` (kept for the valid ones)."""
    items: list[T] = []
    kept: list[bool] = []
    found: list[Rejected] = []
    check = schema.check
    reasons = sum(len(r.errors) for r in rejected)
    for index, item in zip(indices, typed, strict=True):
        problems = check(item, lo, hi)
        if problems:
            if reasons >= MAX_BATCH_REASONS:
                problems = problems[:1]
            reasons += len(problems)
            found.append(Rejected(index, schema.item_id(item), problems))
        else:
            items.append(item)
        kept.append(not problems)
    if found:
        rejected = sorted([*rejected, *found], key=_index)
    if raws is not None and found:
        raws = list(compress(raws, kept))
    return Decoded(items, rejected, None, raws)


def _index(rejected: Rejected) -> int:
    return rejected.index
