"""What an alert says on each channel, and the webhook signature.

The webhook body is the contract's JSON (money as strings, the threshold a number),
serialized once, compactly, when the alert fires: the outbox stores those bytes and
every attempt sends (and signs) exactly them. Slack gets one readable line in Slack's
incoming-webhook JSON (`{"text": ...}`, with `&`, `<` and `>` escaped as Slack asks);
email gets a subject and a plain-text body. Money in the human texts is the exact
decimal, padded to cents and never rounded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from billing.rating import EXACT

FORECAST_EXCEEDED = "budget.forecast_exceeded"
THRESHOLD_CROSSED = "budget.threshold_crossed"
SIGNATURE_PREFIX = "sha256="
_CENT = Decimal("0.01")


def rfc3339(t: datetime) -> str:
    """`2026-11-28T11:00:00.000Z`: UTC, milliseconds, as the rest of the API prints times."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _number(value: Decimal) -> int | float:
    """A decimal as a JSON number; refused if a float cannot carry it exactly."""
    if value == value.to_integral_value():
        return int(value)
    as_float = float(value)
    if Decimal(repr(as_float)) != value:
        raise ValueError(f"{value} is not exact as a JSON number")
    return as_float


def _jsonable(payload: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, Decimal):
            value = _number(value) if key == "threshold" else format(value, "f")
        elif isinstance(value, datetime):
            value = rfc3339(value)
        out[key] = value
    return out


def webhook_body(payload: Mapping[str, Any]) -> str:
    """The contract's webhook JSON, compact UTF-8 (Decimal money becomes a string)."""
    return json.dumps(
        _jsonable(payload), separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def sign(secret: str, body: bytes) -> str:
    """The `X-Metering-Signature` value: sha256=<hex HMAC-SHA256(secret, raw body)>."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    """True if `header` is the signature of `body` with `secret` (constant-time compare).

    A receiver does exactly this over the raw request body, before parsing it:

        expected = "sha256=" + hmac.new(secret, raw_body, hashlib.sha256).hexdigest()
        hmac.compare_digest(expected, request.headers["X-Metering-Signature"])
    """
    given = header.strip()
    if not given.startswith(SIGNATURE_PREFIX):
        return False
    candidate = SIGNATURE_PREFIX + given[len(SIGNATURE_PREFIX) :].lower()
    return hmac.compare_digest(sign(secret, body).encode(), candidate.encode("utf-8", "replace"))


def usd(value: object) -> str:
    """`$1,234.50`: the exact amount, padded to cents (never rounded)."""
    if value is None:
        return "n/a"
    amount = Decimal(str(value))
    if amount.is_finite() and amount.as_tuple().exponent > -2:  # type: ignore[operator]
        amount = amount.quantize(_CENT, context=EXACT)
    return f"${amount:,f}"


def percent(threshold: object) -> str:
    """0.8 -> "80%"."""
    value = (Decimal(str(threshold)) * 100).normalize()
    return f"{value:f}%"


def _scope(payload: Mapping[str, Any]) -> str:
    project = payload.get("project_id")
    tenant = payload.get("tenant_id")
    return f"tenant {tenant} / project {project}" if project else f"tenant {tenant}, all projects"


def summary(payload: Mapping[str, Any]) -> str:
    """One line: budget, tenant/project, what happened, spend of amount, period."""
    head = f"Budget {payload.get('budget_id')} ({_scope(payload)})"
    amount = usd(payload.get("amount_usd"))
    spend = usd(payload.get("spend_usd"))
    period = payload.get("period")
    if payload.get("type") == FORECAST_EXCEEDED:
        forecast = usd(payload.get("forecast_usd"))
        return (
            f"{head}: month-end forecast {forecast} exceeds the budget of {amount} "
            f"(spend so far {spend}) for {period}."
        )
    return (
        f"{head}: {percent(payload.get('threshold'))} threshold crossed, "
        f"spend {spend} of {amount} for {period}."
    )


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(payload: Mapping[str, Any]) -> str:
    """Slack incoming-webhook JSON: {"text": "<one readable line>"}."""
    return json.dumps({"text": _slack_escape(summary(payload))}, ensure_ascii=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def email_body(payload: Mapping[str, Any]) -> str:
    """{"subject", "text"} as JSON; the sender turns it into a message."""
    scope = _one_line(_scope(payload))
    period = _one_line(str(payload.get("period")))
    if payload.get("type") == FORECAST_EXCEEDED:
        subject = f"Budget forecast exceeded: {scope}, {period}"
    else:
        subject = f"Budget {percent(payload.get('threshold'))} threshold crossed: {scope}, {period}"
    lines = [summary(payload), ""]
    lines.append(f"Budget:    {payload.get('budget_id')}")
    lines.append(f"Tenant:    {payload.get('tenant_id')}")
    lines.append(f"Project:   {payload.get('project_id') or '(all projects)'}")
    if payload.get("type") == FORECAST_EXCEEDED:
        lines.append(f"Forecast:  {usd(payload.get('forecast_usd'))}")
    else:
        lines.append(f"Threshold: {percent(payload.get('threshold'))}")
    lines.append(f"Spend:     {usd(payload.get('spend_usd'))}")
    lines.append(f"Amount:    {usd(payload.get('amount_usd'))}")
    lines.append(f"Period:    {period}")
    lines.append(f"At:        {_jsonable(payload).get('at')}")
    return json.dumps({"subject": subject, "text": "\n".join(lines) + "\n"}, ensure_ascii=False)
