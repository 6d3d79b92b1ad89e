"""Schemathesis against /openapi.json of the real app, served by uvicorn on loopback.

Every documented operation is exercised with all of Schemathesis' checks (no server error,
status codes, content types, headers and bodies conforming to the schema, schema-invalid
input refused, schema-valid input accepted, unsupported methods answered 405 with `Allow`,
requests without the token refused), as the admin, on SQLite or PostgreSQL like the rest.

Exclusions, each by design of the contract, on POST /v1/events and /v1/probes only:
- a batch is accepted partially: a schema-invalid item (negative data) does not fail the
  request, it is listed in the 202's `rejected` with its index and reasons while the
  batch's valid items are stored; so a 202 whose `rejected` is non-empty counts as
  refusing the negative data (any other answer to negative data is still checked);
- more than 10,000 items is 413 (the contract's status), not a generic 400;
- a case that says `Content-Encoding: gzip` is sent gzip-compressed (see gzip_as_declared).
"""

from __future__ import annotations

import gzip
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext, positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from schemathesis.core import NOT_SET
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import negative_data_rejection
from schemathesis.transport import requests as schemathesis_requests

from metering.app import create_app, wait_ready
from metering.settings import Settings
from tests.conftest import ADMIN_TOKEN

PARTIAL_BATCHES = {("POST", "/v1/events"), ("POST", "/v1/probes")}
# Reads over a time window have rules across parameters that OpenAPI cannot state
# (`from` before `to`; `window` or `from`/`to`, not both; a span of at most 800 days):
# schema-valid combinations that break them are 400s. Every other check runs, and
# tests/analytics/test_bad_input.py holds those 400s to the contract.
CROSS_FIELD_WINDOWS = {
    ("GET", "/v1/stats"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/providers"),
    ("GET", "/v1/requests"),
    ("GET", "/v1/incidents"),
}

# Budget channels are checked against the network when saved: a webhook or Slack URL must
# resolve, and only to public addresses (METERING_WEBHOOK_ALLOW_PRIVATE). A schema-valid
# URL such as http://127.0.0.1/ or an unresolvable host is a 400 that OpenAPI cannot
# predict; tests/budgets and tests/alerts hold those 400s to the contract.
NETWORK_RULES = {("POST", "/v1/budgets"), ("PATCH", "/v1/budgets/{budget_id}")}
# Stripe's webhook is signed with METERING_STRIPE_WEBHOOK_SECRET: a schema-valid request
# without a valid signature is a 400; tests/invoices/test_stripe.py holds it to the contract.
SIGNED = {("POST", "/v1/stripe/webhook")}


@pytest.fixture
def live_url(settings: Settings) -> Iterator[str]:
    """The app over real stores, served by uvicorn (httptools, as `metering serve`)."""
    app = create_app(settings, ADMIN_TOKEN, run_scheduler=False)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http="httptools", log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    wait_ready(app, timeout=60)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(autouse=True)
def _count_connections_under_urllib3_future(monkeypatch: pytest.MonkeyPatch) -> None:
    """grafana-client depends on niquests, which installs urllib3-future in urllib3's
    place; its pool container has no `keys()`, which Schemathesis calls to count open
    connections before each request (AttributeError on every call). The count only
    decides whether a request dropped on a stale keep-alive connection is sent again;
    without it such a request is sent again once, as browsers do."""
    monkeypatch.setattr(schemathesis_requests, "_count_opened_connections", lambda _: 0)


def _app_schema() -> dict[str, Any]:
    """The schema the app serves at /openapi.json (it does not depend on the stores, so it
    is built at collection time; test_served_schema_is_the_tested_one checks the served
    one is the same)."""
    unused = Path(tempfile.gettempdir()) / "metering-openapi-unused"
    app = create_app(Settings(data_dir=unused, _env_file=None), ADMIN_TOKEN)
    return app.openapi()


# The admin token, through the schema's own bearer scheme: Schemathesis then knows which
# Authorization header it sends (its negative checks hold nothing it overrode against us).
schema = schemathesis.openapi.from_dict(
    _app_schema(),
    config=SchemathesisConfig.from_dict(
        {"auth": {"openapi": {"HTTPBearer": {"bearer": ADMIN_TOKEN}}}}
    ),
)


def test_served_schema_is_the_tested_one(client: TestClient) -> None:
    assert client.get("/openapi.json").json() == _app_schema()


def partial_batch_negative_data_rejection(
    ctx: CheckContext, response: Response, case: Case[Any]
) -> bool | None:
    """negative_data_rejection, except that a 202 listing rejected items is a refusal,
    and so is the contract's 413 for more than 10,000 items in a batch."""
    if response.status_code == 413:
        return None
    if response.status_code == 202:
        body = response.json()
        if isinstance(body, dict) and body.get("rejected"):
            return None
    return negative_data_rejection(ctx, response, case)


def gzip_as_declared(case: Case[Any]) -> dict[str, Any]:
    """The ingest operations document `Content-Encoding: gzip`; Schemathesis sets that
    header but sends the body as generated, which the service rightly refuses as "not
    valid gzip". Send the JSON body compressed when the case says gzip, as a gateway
    does. Passed as the request's `data`, so Schemathesis knows the body was re-encoded
    by the caller: it then checks that such schema-valid bodies are accepted, and no
    longer holds a schema-invalid one against the service (it reached it compressed)."""
    encoding = case.headers.get("Content-Encoding") if case.headers else None
    # Values are case-insensitive (the schema's pattern admits "GZiP" and "x-gzip").
    if (
        (encoding or "").lower() not in ("gzip", "x-gzip")
        or case.media_type != "application/json"
        or case.body is NOT_SET
    ):
        return {}
    sent = case.as_transport_kwargs()
    raw = sent["data"] if "data" in sent else json.dumps(sent["json"]).encode()
    return {"data": gzip.compress(raw)}


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_api_conforms_to_its_schema(case: Case[Any], live_url: str) -> None:
    if (case.method.upper(), case.path) in PARTIAL_BATCHES:
        case.call_and_validate(
            base_url=live_url,
            excluded_checks=[negative_data_rejection],
            additional_checks=[partial_batch_negative_data_rejection],
            timeout=30,
            **gzip_as_declared(case),
        )
    elif (case.method.upper(), case.path) in CROSS_FIELD_WINDOWS | NETWORK_RULES | SIGNED:
        case.call_and_validate(
            base_url=live_url, excluded_checks=[positive_data_acceptance], timeout=30
        )
    else:
        case.call_and_validate(base_url=live_url, timeout=30)
