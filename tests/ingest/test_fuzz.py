"""Property tests of the ingest endpoints: whatever the body, never a 5xx, and the
response always accounts for every item (accepted + duplicates + rejected = sent)."""

from __future__ import annotations

import gzip
import json
import re
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ingest.helpers import event, probe

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=140),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)
EVENT_FIELDS = [
    *event().keys(),
    "api_key_id",
    "region",
    "http_status",
    "error_type",
    "queries",
    "output_tokens",
    "fallbacks",
]
PROBE_FIELDS = [*probe().keys(), "region", "http_status", "error"]


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


FIELD_ERROR = re.compile(r"^(event|probe|[a-z_]+(\[\d+\])?(\.[a-z_]+)?): \S")


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], fields: list[str]) -> Any:
    item = dict(base)
    for field in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)):
        action = draw(st.sampled_from(["drop", "replace"]))
        if action == "drop":
            item.pop(field, None)
        else:
            item[field] = draw(json_values)
    return draw(st.one_of(st.just(item), st.just(item), json_values))


def check_response(response: Any, sent: int, id_field: str) -> None:
    assert response.status_code < 500, response.text
    if response.status_code != 202:
        assert response.status_code in (400, 413)
        assert isinstance(response.json()["error"], str)
        return
    body = response.json()
    assert body["accepted"] + body["duplicates"] + len(body["rejected"]) == sent
    indices = [r["index"] for r in body["rejected"]]
    assert indices == sorted(set(indices))
    for rejected in body["rejected"]:
        assert rejected["errors"] and all(FIELD_ERROR.match(e) for e in rejected["errors"]), (
            rejected
        )
        assert rejected[id_field] is None or isinstance(rejected[id_field], str)
    # Every item msgspec rejects is explained by a named rule (no generic fallback text).
    for rejected in body["rejected"]:
        assert not any("Expected" in e for e in rejected["errors"]), rejected


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(items=st.lists(mutated(event(), EVENT_FIELDS), max_size=6), ndjson=st.booleans())
def test_events_endpoint_never_fails(
    client: TestClient, admin_headers: dict[str, str], items: list[Any], ndjson: bool
) -> None:
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("event_id") == "evt-0":
            item["event_id"] = f"evt-{i}"
    if ndjson:
        body = b"\n".join(_dumps(item) for item in items)
        content_type = "application/x-ndjson"
    else:
        body = _dumps({"events": items})
        content_type = "application/json"
    response = client.post(
        "/v1/events", content=body, headers={**admin_headers, "content-type": content_type}
    )
    check_response(response, len(items), "event_id")


@FUZZ
@given(items=st.lists(mutated(probe(), PROBE_FIELDS), max_size=6))
def test_probes_endpoint_never_fails(
    client: TestClient, admin_headers: dict[str, str], items: list[Any]
) -> None:
    response = client.post(
        "/v1/probes",
        content=_dumps({"probes": items}),
        headers={**admin_headers, "content-type": "application/json"},
    )
    check_response(response, len(items), "probe_id")


@FUZZ
@given(
    body=st.one_of(st.binary(max_size=300), json_values.map(_dumps)),
    content_type=st.sampled_from(["application/json", "application/x-ndjson", "text/plain"]),
)
def test_arbitrary_bodies_never_fail(
    client: TestClient, admin_headers: dict[str, str], body: bytes, content_type: str
) -> None:
    response = client.post(
        "/v1/events", content=body, headers={**admin_headers, "content-type": content_type}
    )
    assert response.status_code in (202, 400), response.text


hostile_fragments = st.sampled_from(
    [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"[" * 1200, b"{}," * 40, b"\x00", b'"\\ud800"']
)


@FUZZ
@given(
    cut=st.integers(min_value=0, max_value=400),
    fragment=hostile_fragments,
    ndjson=st.booleans(),
    gzipped=st.booleans(),
)
def test_hostile_bytes_anywhere_never_fail(
    client: TestClient,
    admin_headers: dict[str, str],
    cut: int,
    fragment: bytes,
    ndjson: bool,
    gzipped: bool,
) -> None:
    """Invalid UTF-8, deep nesting or stray values spliced into a valid body: a 202
    listing each rejected item once with its reasons, or a 400/413 in the error shape;
    never a 5xx."""
    items = [event("a"), event("b"), event("c")]
    if ndjson:
        body = b"\n".join(_dumps(item) for item in items)
        content_type = "application/x-ndjson"
    else:
        body = _dumps({"events": items})
        content_type = "application/json"
    cut = min(cut, len(body))
    body = body[:cut] + fragment + body[cut:]
    headers = {**admin_headers, "content-type": content_type}
    if gzipped:
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    response = client.post("/v1/events", content=body, headers=headers)
    assert response.status_code in (202, 400, 413), response.text
    if response.status_code == 202:
        indices = [r["index"] for r in response.json()["rejected"]]
        assert indices == sorted(set(indices))
        assert all(r["errors"] for r in response.json()["rejected"])
    else:
        assert set(response.json()) == {"error", "errors"}
