"""Batch decoding: a request body into valid items and rejected ones with reasons.

Hot path: one typed msgspec decode of the whole batch. Only a batch that holds an
invalid item takes the slow path, where each item is decoded alone and an invalid one is
explained by `rules.explain_*`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Generic, TypeVar

import msgspec

from metering.ingest.rules import (
    check_event,
    check_probe,
    events_all_valid,
    explain_event,
    explain_probe,
    probes_all_valid,
    window,
)
from metering.ingest.structs import MAX_BATCH_EVENTS, MAX_BODY_BYTES, Event, Probe

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
