"""Event and probe builders for ingest tests."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any


def event(i: int | str = 0, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": f"evt-{i}",
        "timestamp": (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
        "tenant_id": "acct-1",
        "project_id": "proj-1",
        "provider": "cohere",
        "model": "rerank-4-pro",
        "status": "ok",
        "documents": 50,
        "input_tokens": 5000,
        "latency_ms": 120.5,
    }
    body.update(overrides)
    return body


def probe(i: int | str = 0, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "probe_id": f"probe-{i}",
        "timestamp": (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
        "provider": "cohere",
        "ok": True,
        "latency_ms": 80.0,
    }
    body.update(overrides)
    return body


def stored_count(services: Any, table: str = "rerank_events") -> tuple[int, int]:
    """(rows, distinct ids) in a ClickHouse table, after the writer caught up."""
    assert services.events.wait_stored() and services.probes.wait_stored()
    id_col = "event_id" if table == "rerank_events" else "probe_id"
    rows = services.ch.query(f"SELECT count(), uniqExact({id_col}) FROM {table}").result_rows
    return int(rows[0][0]), int(rows[0][1])


def failing_first(times: int, real: Callable[..., Any], error: Exception) -> Any:
    """A stand-in for `real` that raises `error` on its first `times` calls; `.left`
    tells how many failures are still to come."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if wrapper.left:  # type: ignore[attr-defined]
            wrapper.left -= 1  # type: ignore[attr-defined]
            raise error
        return real(*args, **kwargs)

    wrapper.left = times  # type: ignore[attr-defined]
    return wrapper
