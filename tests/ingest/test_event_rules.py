"""Every contract rule for events and probes, with the exact error text; partial
acceptance; body-level errors (400/413)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient

from metering.services import Services
from tests.ingest.helpers import event, probe, stored_count

MISSING = object()


def _minus(days: float = 0, minutes: float = 0) -> str:
    return (datetime.now(UTC) - timedelta(days=days, minutes=minutes)).isoformat()


EVENT_RULES: list[tuple[str, Any, list[str]]] = [
    ("event_id", MISSING, ["event_id: required"]),
    ("event_id", "", ["event_id: must not be empty"]),
    ("event_id", "x" * 129, ["event_id: must be at most 128 characters"]),
    ("event_id", 7, ["event_id: must be a string"]),
    ("timestamp", MISSING, ["timestamp: required"]),
    (
        "timestamp",
        "yesterday",
        ["timestamp: must be an RFC 3339 timestamp, e.g. 2026-11-27T10:00:00Z"],
    ),
    ("timestamp", "2026-11-27T10:00:00", ["timestamp: must include a UTC offset (Z or +hh:mm)"]),
    (
        "timestamp",
        lambda: _minus(minutes=-6),
        ["timestamp: must not be more than 5 minutes in the future"],
    ),
    ("timestamp", lambda: _minus(days=401), ["timestamp: must not be more than 400 days old"]),
    ("tenant_id", MISSING, ["tenant_id: required"]),
    ("tenant_id", "", ["tenant_id: must not be empty"]),
    ("tenant_id", "a" * 65, ["tenant_id: must be at most 64 characters"]),
    ("tenant_id", "acct 1", ["tenant_id: must contain only [A-Za-z0-9_.:-]"]),
    ("project_id", "proj/1", ["project_id: must contain only [A-Za-z0-9_.:-]"]),
    ("api_key_id", "k" * 65, ["api_key_id: must be at most 64 characters"]),
    ("provider", MISSING, ["provider: required"]),
    ("provider", "Cohere", ["provider: must contain only [a-z0-9_-]"]),
    ("provider", "p" * 65, ["provider: must be at most 64 characters"]),
    ("model", "", ["model: must not be empty"]),
    ("model", "m" * 129, ["model: must be at most 128 characters"]),
    ("region", "r" * 65, ["region: must be at most 64 characters"]),
    ("status", "failed", ['status: must be "ok" or "error"']),
    ("status", MISSING, ["status: required"]),
    ("http_status", 99, ["http_status: must be >= 100"]),
    ("http_status", 600, ["http_status: must be <= 599"]),
    ("http_status", "500", ["http_status: must be an integer"]),
    ("error_type", "e" * 65, ["error_type: must be at most 64 characters"]),
    ("queries", 0, ["queries: must be >= 1"]),
    ("documents", -1, ["documents: must be >= 0"]),
    ("documents", 100_001, ["documents: must be <= 100000"]),
    ("documents", 1.5, ["documents: must be an integer"]),
    ("documents", MISSING, ["documents: required"]),
    ("input_tokens", -5, ["input_tokens: must be >= 0"]),
    ("input_tokens", True, ["input_tokens: must be an integer"]),
    ("input_tokens", 10**12 + 1, ["input_tokens: must be <= 1000000000000"]),
    ("input_tokens", 2**64, ["input_tokens: must be <= 1000000000000"]),
    ("queries", 2**32, ["queries: must be <= 4294967295"]),
    ("output_tokens", -1, ["output_tokens: must be >= 0"]),
    ("latency_ms", -0.5, ["latency_ms: must be >= 0"]),
    ("latency_ms", "fast", ["latency_ms: must be a number"]),
    ("latency_ms", MISSING, ["latency_ms: required"]),
    ("latency_ms", 86_400_000.5, ["latency_ms: must be <= 86400000 (one day)"]),
    ("latency_ms", 1.79e308, ["latency_ms: must be <= 86400000 (one day)"]),
    ("fallbacks", "cohere", ["fallbacks: must be a list"]),
    (
        "fallbacks",
        [{"provider": "azure", "latency_ms": 3}] * 17,
        ["fallbacks: at most 16 per event"],
    ),
    (
        "fallbacks",
        [{"provider": "azure", "latency_ms": 86_400_001}],
        ["fallbacks[0].latency_ms: must be <= 86400000 (one day)"],
    ),
    ("fallbacks", [{"latency_ms": 3}], ["fallbacks[0].provider: required"]),
    (
        "fallbacks",
        [{"provider": "Azure", "latency_ms": 3}],
        ["fallbacks[0].provider: must contain only [a-z0-9_-]"],
    ),
    (
        "fallbacks",
        [{"provider": "azure", "latency_ms": -3, "http_status": 42}],
        ["fallbacks[0].latency_ms: must be >= 0", "fallbacks[0].http_status: must be >= 100"],
    ),
]


def post(
    client: TestClient,
    headers: dict[str, str],
    path: str,
    body: Any,
    content_type: str = "application/json",
) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=data, headers={**headers, "content-type": content_type})


def broken(item: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """`item` with `field` removed (MISSING) or set to `value` (a callable is called, so
    times are relative to the test's now)."""
    if value is MISSING:
        del item[field]
    else:
        item[field] = value() if callable(value) else value
    return item


@pytest.mark.parametrize(
    ("field", "value", "errors"), EVENT_RULES, ids=[f"{f}={str(v)[:12]}" for f, v, _ in EVENT_RULES]
)
def test_event_rule_names_field_and_rule(
    client: TestClient,
    admin_headers: dict[str, str],
    services: Services,
    field: str,
    value: Any,
    errors: list[str],
) -> None:
    bad = broken(event("bad"), field, value)
    response = post(client, admin_headers, "/v1/events", {"events": [event("a"), bad, event("b")]})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == 2 and body["duplicates"] == 0
    expected_id = bad.get("event_id") if isinstance(bad.get("event_id"), str) else None
    assert body["rejected"] == [{"index": 1, "event_id": expected_id, "errors": errors}]
    assert stored_count(services) == (2, 2)


def test_every_broken_rule_is_listed(client: TestClient, admin_headers: dict[str, str]) -> None:
    bad = event("multi", documents=-1, provider="Bad Provider", status="meh", queries=0)
    response = post(client, admin_headers, "/v1/events", {"events": [bad]})
    assert response.json()["rejected"][0]["errors"] == [
        "provider: must contain only [a-z0-9_-]",
        'status: must be "ok" or "error"',
        "queries: must be >= 1",
        "documents: must be >= 0",
    ]


def test_optional_fields_and_defaults_are_stored(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    full = event(
        "full",
        api_key_id="key-9",
        region="us-east",
        status="error",
        http_status=503,
        error_type="provider_5xx",
        queries=3,
        output_tokens=7,
        fallbacks=[
            {
                "provider": "azure",
                "model": "rerank-4-pro",
                "region": "us-east",
                "latency_ms": 40.5,
                "error_type": "timeout",
                "http_status": 504,
            }
        ],
    )
    minimal = event("minimal")
    response = post(client, admin_headers, "/v1/events", {"events": [full, minimal]})
    assert response.json() == {"accepted": 2, "duplicates": 0, "rejected": []}
    stored_count(services)
    rows = services.ch.query(
        "SELECT event_id, api_key_id, region, status, http_status, error_type, queries,"
        " output_tokens, fallbacks FROM rerank_events ORDER BY event_id"
    ).result_rows
    assert rows[0] == (
        "evt-full",
        "key-9",
        "us-east",
        "error",
        503,
        "provider_5xx",
        3,
        7,
        [
            {
                "provider": "azure",
                "model": "rerank-4-pro",
                "region": "us-east",
                "latency_ms": 40.5,
                "error_type": "timeout",
                "http_status": 504,
            }
        ],
    )
    assert rows[1] == ("evt-minimal", "", "global", "ok", 0, "", 1, 0, [])


@pytest.mark.parametrize("ndjson", [False, True])
def test_stored_values_match_what_was_validated(
    client: TestClient, admin_headers: dict[str, str], services: Services, ndjson: bool
) -> None:
    """A valid batch is stored from the gateway's own bytes: ClickHouse must read every
    RFC 3339 form, omitted optional field and null exactly as the validator did."""
    at = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    forms = {
        "z": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lower": at.strftime("%Y-%m-%dt%H:%M:%Sz"),
        "millis": at.strftime("%Y-%m-%dT%H:%M:%S") + ".123Z",
        "nanos": at.strftime("%Y-%m-%dT%H:%M:%S") + ".123456789+00:00",
        "plus0530": at.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(),
        "minus08": at.astimezone(timezone(timedelta(hours=-8))).isoformat(),
    }
    events = [event(name, timestamp=value) for name, value in forms.items()]
    events.append(
        event(
            "nulls",
            api_key_id=None,
            http_status=None,
            error_type=None,
            extra_field={"ignored": [1, None]},
        )
    )
    if ndjson:
        body = b"\n".join(json.dumps(e).encode() for e in events)
        response = post(client, admin_headers, "/v1/events", body, "application/x-ndjson")
    else:
        response = post(client, admin_headers, "/v1/events", {"events": events})
    assert response.json() == {"accepted": 7, "duplicates": 0, "rejected": []}
    stored_count(services)
    rows = dict(
        services.ch.query(
            "SELECT event_id, timestamp FROM rerank_events WHERE event_id != 'evt-nulls'"
        ).result_rows
    )
    millis = at + timedelta(milliseconds=123)
    expected = {
        "z": at,
        "lower": at,
        "millis": millis,
        "nanos": millis,
        "plus0530": at,
        "minus08": at,
    }
    assert {k[4:]: v.replace(tzinfo=UTC) for k, v in rows.items()} == expected
    nulls = services.ch.query(
        "SELECT api_key_id, http_status, error_type, region, queries, output_tokens, fallbacks"
        " FROM rerank_events WHERE event_id = 'evt-nulls'"
    ).result_rows
    assert nulls == [("", 0, "", "global", 1, 0, [])]


def test_bytes_clickhouse_refuses_are_stored_after_one_retry(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    """A duplicate JSON key: the validator keeps the last value, ClickHouse refuses the
    raw row. The writer's retry stores the validated values instead."""
    raw = json.dumps(event("dupkey")).encode()
    raw = raw[:-1] + b', "documents": 77}'
    body = b'{"events": [' + raw + b"]}"
    response = post(client, admin_headers, "/v1/events", body)
    assert response.json()["accepted"] == 1
    assert services.events.wait_stored(timeout=20)
    rows = services.ch.query("SELECT documents FROM rerank_events").result_rows
    assert rows == [(77,)]


PROBE_RULES: list[tuple[str, Any, list[str]]] = [
    ("probe_id", MISSING, ["probe_id: required"]),
    ("probe_id", "", ["probe_id: must not be empty"]),
    (
        "timestamp",
        "2026-13-01T00:00:00Z",
        ["timestamp: must be an RFC 3339 timestamp, e.g. 2026-11-27T10:00:00Z"],
    ),
    ("provider", "AWS", ["provider: must contain only [a-z0-9_-]"]),
    ("ok", MISSING, ["ok: required"]),
    ("ok", "yes", ["ok: must be true or false"]),
    ("latency_ms", -1, ["latency_ms: must be >= 0"]),
    ("latency_ms", 1e12, ["latency_ms: must be <= 86400000 (one day)"]),
    ("http_status", 700, ["http_status: must be <= 599"]),
    ("region", "r" * 65, ["region: must be at most 64 characters"]),
    ("error", "e" * 1025, ["error: must be at most 1024 characters"]),
]


@pytest.mark.parametrize(
    ("field", "value", "errors"), PROBE_RULES, ids=[f"{f}={str(v)[:12]}" for f, v, _ in PROBE_RULES]
)
def test_probe_rule_names_field_and_rule(
    client: TestClient,
    admin_headers: dict[str, str],
    services: Services,
    field: str,
    value: Any,
    errors: list[str],
) -> None:
    bad = broken(probe("bad"), field, value)
    response = post(client, admin_headers, "/v1/probes", {"probes": [probe("a"), bad]})
    assert response.status_code == 202, response.text
    expected_id = bad.get("probe_id") if isinstance(bad.get("probe_id"), str) else None
    assert response.json() == {
        "accepted": 1,
        "duplicates": 0,
        "rejected": [{"index": 1, "probe_id": expected_id, "errors": errors}],
    }
    assert stored_count(services, "uptime_probes") == (1, 1)


def test_ndjson_body(client: TestClient, admin_headers: dict[str, str], services: Services) -> None:
    lines = [msgspec.json.encode(event(i)) for i in range(5)]
    lines.insert(2, b"{not json")
    lines.insert(4, msgspec.json.encode(event("neg", documents=-2)))
    body = b"\n".join(lines) + b"\n\n"
    response = post(client, admin_headers, "/v1/events", body, "application/x-ndjson")
    assert response.status_code == 202
    result = response.json()
    assert result["accepted"] == 5 and result["duplicates"] == 0
    assert [r["index"] for r in result["rejected"]] == [2, 4]
    assert result["rejected"][0]["errors"][0].startswith("event: not valid JSON")
    assert result["rejected"][1]["errors"] == ["documents: must be >= 0"]
    assert stored_count(services) == (5, 5)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"", "application/json", "body: not valid JSON"),
        (b"{events:[]}", "application/json", "body: not valid JSON"),
        (b"[]", "application/json", 'body: must be a JSON object {"events": [...]}'),
        (b'{"items": []}', "application/json", 'body: missing "events" (a list)'),
        (b'{"events": {"a": 1}}', "application/json", "events: must be a list"),
        (b"hello\nworld\n", "application/x-ndjson", "body: not valid NDJSON"),
    ],
)
def test_unusable_body_is_400(
    client: TestClient, admin_headers: dict[str, str], body: bytes, content_type: str, message: str
) -> None:
    response = post(client, admin_headers, "/v1/events", body, content_type)
    assert response.status_code == 400
    assert response.json()["error"].startswith(message)


def test_more_than_10000_events_is_413(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    events = [event(i) for i in range(10_001)]
    response = post(client, admin_headers, "/v1/events", {"events": events})
    assert response.status_code == 413
    assert response.json()["error"] == "events: at most 10000 per request"
    ok = post(client, admin_headers, "/v1/events", {"events": events[:10_000]})
    assert ok.json()["accepted"] == 10_000
    assert stored_count(services) == (10_000, 10_000)


def test_body_over_16_mib_is_413(client: TestClient, admin_headers: dict[str, str]) -> None:
    padding = "x" * (16 * 1024 * 1024)
    response = post(
        client, admin_headers, "/v1/events", {"events": [event(1, model="m")], "pad": padding}
    )
    assert response.status_code == 413
    assert "16 MiB" in response.json()["error"]


def test_empty_batch_is_fine(client: TestClient, admin_headers: dict[str, str]) -> None:
    response = post(client, admin_headers, "/v1/events", {"events": []})
    assert response.json() == {"accepted": 0, "duplicates": 0, "rejected": []}


@pytest.mark.parametrize(
    "body",
    [
        b'{"events": [E1, E2]}',
        b' \n{ "events" :\n[E1, E2] } \n',
        b'{"source": "gw-1", "events": [E1, E2]}',
        b'{"events": [E1, E2], "note": [1]}',
        b'{"events": [E0], "events": [E1, E2]}',
    ],
    ids=["plain", "spaced", "key-before", "list-after", "repeated-key"],
)
def test_unusual_envelopes_store_exactly_the_validated_items(
    client: TestClient, admin_headers: dict[str, str], services: Services, body: bytes
) -> None:
    for name in ("E0", "E1", "E2"):
        body = body.replace(name.encode(), json.dumps(event(name.lower())).encode())
    response = post(client, admin_headers, "/v1/events", body)
    assert response.json() == {"accepted": 2, "duplicates": 0, "rejected": []}
    assert services.events.wait_stored(timeout=20)
    ids = services.ch.query("SELECT event_id FROM rerank_events ORDER BY event_id").result_rows
    assert ids == [("evt-e1",), ("evt-e2",)]


@pytest.mark.parametrize("ndjson", [False, True])
def test_keys_outside_the_schema_never_reach_storage(
    client: TestClient, admin_headers: dict[str, str], services: Services, ndjson: bool
) -> None:
    """A fully valid batch is stored from the gateway's bytes: a server-side column in
    them (ingested_at) must still be set by the server."""
    events = [event(i, ingested_at="2030-01-01T00:00:00Z") for i in range(3)]
    if ndjson:
        body = b"\n".join(json.dumps(e).encode() for e in events)
        response = post(client, admin_headers, "/v1/events", body, "application/x-ndjson")
    else:
        response = post(client, admin_headers, "/v1/events", {"events": events})
    assert response.json() == {"accepted": 3, "duplicates": 0, "rejected": []}
    stored_count(services)
    rows = services.ch.query("SELECT max(ingested_at), min(ingested_at) FROM rerank_events")
    latest, earliest = rows.result_rows[0]
    now = datetime.now(UTC).replace(tzinfo=None)
    assert earliest > now - timedelta(hours=1) and latest < now + timedelta(minutes=5)


def test_probe_keys_outside_the_schema_never_reach_storage(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    probes = [probe(i, ingested_at="2030-01-01T00:00:00Z") for i in range(2)]
    response = post(client, admin_headers, "/v1/probes", {"probes": probes})
    assert response.json() == {"accepted": 2, "duplicates": 0, "rejected": []}
    stored_count(services, "uptime_probes")
    [(latest,)] = services.ch.query("SELECT max(ingested_at) FROM uptime_probes").result_rows
    assert latest < datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=5)


@pytest.mark.parametrize("ndjson", [False, True])
def test_leap_second_is_stored_in_its_own_minute(
    client: TestClient, admin_headers: dict[str, str], services: Services, ndjson: bool
) -> None:
    day = (datetime.now(UTC) - timedelta(days=3)).date()
    events = [event("leap", timestamp=f"{day}T23:59:60Z"), event("plain")]
    if ndjson:
        body = b"\n".join(json.dumps(e).encode() for e in events)
        response = post(client, admin_headers, "/v1/events", body, "application/x-ndjson")
    else:
        response = post(client, admin_headers, "/v1/events", {"events": events})
    assert response.json() == {"accepted": 2, "duplicates": 0, "rejected": []}
    stored_count(services)
    rows = services.ch.query(
        "SELECT timestamp FROM rerank_events WHERE event_id = 'evt-leap'"
    ).result_rows
    assert rows == [(datetime(day.year, day.month, day.day, 23, 59, 59, 999_000),)]


@pytest.mark.parametrize("ndjson", [False, True])
def test_invalid_utf8_in_a_string_is_a_rejection_not_a_500(
    client: TestClient, admin_headers: dict[str, str], services: Services, ndjson: bool
) -> None:
    good = json.dumps(event("good")).encode()
    bad = json.dumps(event("bad")).encode().replace(b"rerank-4-pro", b"rerank-\xff\xfe")
    if ndjson:
        response = post(
            client, admin_headers, "/v1/events", good + b"\n" + bad, "application/x-ndjson"
        )
    else:
        response = post(
            client, admin_headers, "/v1/events", b'{"events": [' + good + b"," + bad + b"]}"
        )
    assert response.status_code == 202, response.text
    assert response.json()["rejected"] == [
        {"index": 1, "event_id": None, "errors": ["event: not valid UTF-8 inside a string"]}
    ]
    assert stored_count(services) == (1, 1)


def test_json_nested_1000_deep_is_400(client: TestClient, admin_headers: dict[str, str]) -> None:
    deep = b"[" * 1000 + b"]" * 1000
    response = post(client, admin_headers, "/v1/events", b'{"events": ' + deep + b"}")
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "body: JSON nested too deeply (at most 1000 levels)"
    ndjson = json.dumps(event("ok")).encode() + b'\n{"a": ' + deep + b"}"
    response = post(client, admin_headers, "/v1/events", ndjson, "application/x-ndjson")
    assert response.status_code == 202, response.text
    assert response.json()["rejected"] == [
        {
            "index": 1,
            "event_id": None,
            "errors": ["event: JSON nested too deeply (at most 1000 levels)"],
        }
    ]


def test_worst_case_bodies_get_their_rule(
    client: TestClient, admin_headers: dict[str, str], services: Services
) -> None:
    """Hundreds of thousands of `{}` fallbacks: one bounded rejection, the valid event
    stored; millions: 413 at once; 16 MiB of NDJSON garbage: 413 naming the rule."""
    ok = json.dumps(event("ok")).encode()
    many = json.dumps(event("many")).encode()[:-1] + b', "fallbacks": ['
    body = b'{"events": [' + ok + b"," + many + b",".join([b"{}"] * 300_000) + b"]}]}"
    response = post(client, admin_headers, "/v1/events", body)
    assert response.status_code == 202, response.text
    [rejected] = response.json()["rejected"]
    assert rejected["index"] == 1 and rejected["event_id"] == "evt-many"
    assert rejected["errors"][0] == "fallbacks: at most 16 per event"
    assert len(rejected["errors"]) == 20
    assert stored_count(services) == (1, 1)
    body = b'{"events": [' + ok + b"," + many + b",".join([b"{}"] * 4_000_000) + b"]}]}"
    response = post(client, admin_headers, "/v1/events", body)
    assert response.status_code == 413
    assert response.json()["error"].startswith('body: at most 340000 "{" per request')
    garbage = b"\x01garbage}\n" * (16 * 1024 * 1024 // 10)
    response = post(client, admin_headers, "/v1/events", garbage, "application/x-ndjson")
    assert response.status_code == 413
    assert response.json()["errors"] == ["events: at most 10000 per request"]
