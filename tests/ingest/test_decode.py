"""decode_batch on hostile and unusual bodies, without the app: bounded reasons, bounded
fallbacks, bad bytes and deep nesting as 400 or per-item rejections (never an uncaught
exception), leap seconds, and the large-body path agreeing with the fast path."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from metering.ingest.decode import (
    EVENTS,
    GROUP_BYTES,
    MAX_BATCH_REASONS,
    PROBES,
    BodyError,
    TooLarge,
    decode_batch,
    decode_fast,
)
from metering.ingest.rules import MAX_ITEM_ERRORS
from tests.ingest.helpers import event, probe


def _json(events: list[Any]) -> bytes:
    return msgspec.json.encode({"events": events})


def _ndjson(items: list[Any]) -> bytes:
    return b"\n".join(msgspec.json.encode(item) for item in items)


def test_millions_of_empty_fallbacks_are_413_at_once() -> None:
    many = b'"evt-many","fallbacks":[' + b",".join([b"{}"] * 4_000_000) + b"]"
    body = _json([event("ok"), event("many")]).replace(b'"evt-many"', many)
    with pytest.raises(TooLarge, match=r'^body: at most 340000 "\{" per request'):
        decode_batch(EVENTS, body, ndjson=False)


def test_many_empty_fallbacks_are_one_bounded_rejection() -> None:
    many = b'"evt-many","fallbacks":[' + b",".join([b"{}"] * 300_000) + b"]"
    body = _json([event("ok"), event("many")]).replace(b'"evt-many"', many)
    decoded = decode_batch(EVENTS, body, ndjson=False)
    assert [item.event_id for item in decoded.items] == ["evt-ok"]
    [rejected] = decoded.rejected
    assert (rejected.index, rejected.item_id) == (1, "evt-many")
    assert rejected.errors[:3] == [
        "fallbacks: at most 16 per event",
        "fallbacks[0].provider: required",
        "fallbacks[0].latency_ms: required",
    ]
    assert len(rejected.errors) == MAX_ITEM_ERRORS


def test_too_many_valid_fallbacks_are_rejected_with_the_count_rule() -> None:
    attempt = {"provider": "azure", "latency_ms": 3}
    small = event("small", fallbacks=[attempt] * 17)
    large = event("large", fallbacks=[attempt] * 30_000)  # larger than one decode group
    assert len(_json([large])) > GROUP_BYTES
    for item in (small, large):
        decoded = decode_batch(EVENTS, _json([item]), ndjson=False)
        assert decoded.items == []
        assert decoded.rejected[0].errors == ["fallbacks: at most 16 per event"]
    sixteen = decode_batch(EVENTS, _json([event("ok", fallbacks=[attempt] * 16)]), ndjson=False)
    assert len(sixteen.items) == 1 and len(sixteen.items[0].fallbacks) == 16


def test_reasons_are_capped_per_batch_but_every_rejected_item_is_listed() -> None:
    bad = [event(i, documents=-1, queries=0, status="meh", fallbacks=[{}] * 17) for i in range(500)]
    decoded = decode_batch(EVENTS, _json([event("ok"), *bad]), ndjson=False)
    assert len(decoded.items) == 1
    assert [r.index for r in decoded.rejected] == list(range(1, 501))
    assert all(len(r.errors) <= MAX_ITEM_ERRORS for r in decoded.rejected)
    total = sum(len(r.errors) for r in decoded.rejected)
    assert MAX_BATCH_REASONS <= total < MAX_BATCH_REASONS + MAX_ITEM_ERRORS + 500
    assert decoded.rejected[0].errors[0] == 'status: must be "ok" or "error"'
    assert decoded.rejected[-1].errors == ['status: must be "ok" or "error"']


def test_reasons_from_post_decode_rules_are_capped_too() -> None:
    old = (datetime.now(UTC) - timedelta(days=500)).isoformat()
    items = [
        event(i, timestamp=old, tenant_id="a b", project_id="c d", provider="X") for i in range(400)
    ]
    decoded = decode_batch(EVENTS, _json(items), ndjson=False)
    assert len(decoded.rejected) == 400
    assert len(decoded.rejected[0].errors) == 4
    assert decoded.rejected[-1].errors == ["timestamp: must not be more than 400 days old"]
    assert sum(len(r.errors) for r in decoded.rejected) < MAX_BATCH_REASONS + 400


@pytest.mark.parametrize("lines", [8_000_000, 10_001])
def test_ndjson_with_too_many_lines_is_413(lines: int) -> None:
    body = b"x\n" * lines
    with pytest.raises(TooLarge, match=r"^events: at most 10000 per request$"):
        decode_batch(EVENTS, body, ndjson=True)


def test_ndjson_of_blank_lines_is_an_empty_batch() -> None:
    decoded = decode_batch(EVENTS, b"\n \r\n" * 4_000_000, ndjson=True)
    assert decoded.items == [] and decoded.rejected == []


def test_ndjson_garbage_is_400() -> None:
    with pytest.raises(BodyError, match=r"^body: not valid NDJSON \(one JSON object per line\)"):
        decode_batch(EVENTS, (b"\x00\xff garbage [" * 1000 + b"\n") * 1000, ndjson=True)


def test_json_list_longer_than_10000_is_413_without_building_it() -> None:
    body = b'{"events": [' + b",".join([b"1"] * 5_000_000) + b"]}"
    with pytest.raises(TooLarge, match=r"^events: at most 10000 per request$"):
        decode_batch(EVENTS, body, ndjson=False)


DEEP = b"[" * 2000 + b"]" * 2000


@pytest.mark.parametrize(
    "body",
    [
        b'{"events": ' + DEEP + b"}",
        b'{"events": [{"x": ' + DEEP + b"}]}",
        b'{"other": ' + DEEP + b', "events": []}',
    ],
    ids=["list", "in-item", "beside"],
)
def test_json_nested_too_deeply_is_400(body: bytes) -> None:
    with pytest.raises(BodyError, match=r"^body: JSON nested too deeply"):
        decode_batch(EVENTS, body, ndjson=False)


def test_ndjson_line_nested_too_deeply_is_rejected_alone() -> None:
    body = _ndjson([event(1)]) + b'\n{"x": ' + DEEP + b"}\n" + _ndjson([event(2)])
    decoded = decode_batch(EVENTS, body, ndjson=True)
    assert [item.event_id for item in decoded.items] == ["evt-1", "evt-2"]
    assert [(r.index, r.errors) for r in decoded.rejected] == [
        (1, ["event: JSON nested too deeply (at most 1000 levels)"])
    ]
    with pytest.raises(BodyError, match=r"^body: not valid NDJSON"):
        decode_batch(EVENTS, b'{"x": ' + DEEP + b"}", ndjson=True)


@pytest.mark.parametrize("ndjson", [False, True])
def test_invalid_utf8_in_a_string_rejects_that_item_only(ndjson: bool) -> None:
    good = msgspec.json.encode(event("good"))
    bad = msgspec.json.encode(event("bad")).replace(b"acct-1", b"acct-\xff\xfe")
    body = good + b"\n" + bad if ndjson else b'{"events": [' + good + b"," + bad + b"]}"
    decoded = decode_batch(EVENTS, body, ndjson=ndjson)
    assert [item.event_id for item in decoded.items] == ["evt-good"]
    assert [(r.index, r.errors) for r in decoded.rejected] == [
        (1, ["event: not valid UTF-8 inside a string"])
    ]


def test_invalid_utf8_in_a_probe_is_rejected() -> None:
    bad = msgspec.json.encode(probe("bad")).replace(b"cohere", b"coh\xc3(")
    decoded = decode_batch(PROBES, b'{"probes": [' + bad + b"]}", ndjson=False)
    assert [r.errors for r in decoded.rejected] == [["probe: not valid UTF-8 inside a string"]]


@pytest.mark.parametrize("ndjson", [False, True])
def test_leap_second_is_accepted_at_59_999(ndjson: bool) -> None:
    day = (datetime.now(UTC) - timedelta(days=2)).date()
    items = [
        event("leap", timestamp=f"{day}T23:59:60Z"),
        event("leap-frac", timestamp=f"{day}T23:59:60.5Z"),
        event("leap-offset", timestamp=f"{day}T18:59:60-05:00"),
        event("bad", timestamp=f"{day}T23:59:61Z"),
    ]
    body = _ndjson(items) if ndjson else _json(items)
    decoded = decode_batch(EVENTS, body, ndjson=ndjson)
    expected = datetime(day.year, day.month, day.day, 23, 59, 59, 999_000, tzinfo=UTC)
    assert [item.timestamp for item in decoded.items] == [expected] * 3
    assert decoded.raw is None  # re-encoded: the bytes as sent say :60
    assert [(r.index, r.errors) for r in decoded.rejected] == [
        (3, ["timestamp: must be an RFC 3339 timestamp, e.g. 2026-11-27T10:00:00Z"])
    ]


def test_latency_above_one_day_is_rejected() -> None:
    items = [
        event("a", latency_ms=86_400_001),
        event("b", fallbacks=[{"provider": "azure", "latency_ms": 1e300}]),
        event("c", latency_ms=86_400_000),
    ]
    decoded = decode_batch(EVENTS, _json(items), ndjson=False)
    assert [item.event_id for item in decoded.items] == ["evt-c"]
    assert [r.errors for r in decoded.rejected] == [
        ["latency_ms: must be <= 86400000 (one day)"],
        ["fallbacks[0].latency_ms: must be <= 86400000 (one day)"],
    ]
    probes = decode_batch(
        PROBES, msgspec.json.encode({"probes": [probe(latency_ms=9e9)]}), ndjson=False
    )
    assert probes.rejected[0].errors == ["latency_ms: must be <= 86400000 (one day)"]


@pytest.mark.parametrize("ndjson", [False, True])
def test_large_valid_body_decodes_like_the_fast_path(ndjson: bool) -> None:
    attempt = {"provider": "azure", "model": "m", "latency_ms": 3.5}
    items = [event(i, fallbacks=[attempt] * (i % 17)) for i in range(6_000)]
    body = _ndjson(items) if ndjson else _json(items)
    assert len(body) > 2 * GROUP_BYTES
    assert decode_fast(EVENTS, body, ndjson=ndjson) is None  # too large for the loop
    decoded = decode_batch(EVENTS, body, ndjson=ndjson)
    assert decoded.rejected == []
    assert [item.event_id for item in decoded.items] == [f"evt-{i}" for i in range(6_000)]
    array = decoded.array()  # the items' bytes as sent, joined without encoding
    assert array is not None
    assert json.loads(array) == items


def test_large_body_with_some_invalid_items_keeps_the_valid_ones() -> None:
    items = [event(i, documents=-1 if i % 1000 == 7 else 1) for i in range(8_000)]
    decoded = decode_batch(EVENTS, _json(items), ndjson=False)
    assert len(decoded.items) == 7_992
    assert [r.index for r in decoded.rejected] == [i for i in range(8_000) if i % 1000 == 7]
    assert {tuple(r.errors) for r in decoded.rejected} == {("documents: must be >= 0",)}


@pytest.mark.parametrize("ndjson", [False, True])
def test_valid_items_of_a_partial_batch_keep_their_bytes_as_sent(ndjson: bool) -> None:
    """A large batch with rejected items: each valid item's JSON is kept as sent (keys
    outside the schema included: the store's column list drops them), so the spool does
    not encode 10,000 items again; a leap second is the one item encoded again."""
    day = (datetime.now(UTC) - timedelta(days=2)).date()
    items = [event(i, note="x" * 200) for i in range(6_000)]
    items[7]["documents"] = -1  # refused by msgspec: decoded alone, explained
    items[4_000]["tenant_id"] = "acme corp"  # refused by the rules after decoding
    items[5_000]["timestamp"] = f"{day}T23:59:60Z"
    body = _ndjson(items) if ndjson else _json(items)
    assert len(body) > 2 * GROUP_BYTES
    decoded = decode_batch(EVENTS, body, ndjson=ndjson)
    assert [r.index for r in decoded.rejected] == [7, 4_000]
    assert decoded.raw is None and decoded.raws is not None
    assert len(decoded.raws) == len(decoded.items) == 5_998
    sent = [msgspec.json.encode(item) for i, item in enumerate(items) if i not in (7, 4_000)]
    leap = sent.index(msgspec.json.encode(items[5_000]))
    assert [bytes(raw) for i, raw in enumerate(decoded.raws) if i != leap] == [
        s for i, s in enumerate(sent) if i != leap
    ]
    assert msgspec.json.decode(decoded.raws[leap])["timestamp"] == f"{day}T23:59:59.999000Z"
    keep = [i % 3 != 0 for i in range(len(decoded.items))]
    array = decoded.array(keep)
    assert array is not None
    kept = [item.event_id for item, k in zip(decoded.items, keep, strict=True) if k]
    assert [row["event_id"] for row in json.loads(array)] == kept
    assert decoded.array([False] * len(keep)) == b"[]"


def test_a_batch_decoded_on_the_loop_has_no_item_bytes() -> None:
    """The fast path keeps the whole array when every item is valid, and nothing when
    one is not (the spool then encodes the accepted items)."""
    good = decode_fast(EVENTS, _json([event(1), event(2)]), ndjson=False)
    assert good is not None and good.array() == good.raw
    assert good.array([True, False]) is None
    partial = decode_fast(EVENTS, _json([event(1), event(2, tenant_id="a b")]), ndjson=False)
    assert partial is not None and partial.raw is None and partial.array() is None
