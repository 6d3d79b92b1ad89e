"""The one error shape of the JSON API (shared/CONTRACT.md, "Errors").

Every 4xx and 5xx answer under `/v1/` has the body
`{"error": "<field>: <rule>", "errors": ["<field>: <rule>", ...]}`: `errors` lists every
problem found (at most 100), `error` is the first. Invalid input is 400, never FastAPI's
422. This module holds the shape, the exception that carries it (`ApiError`), the texts
for FastAPI's and Starlette's own errors, and the rewrite of the OpenAPI schema that
documents it (an `Error` component, 400 instead of 422).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

MAX_ERRORS = 100

_encoder = msgspec.json.Encoder()


class Error(BaseModel):
    """The body of every 4xx and 5xx answer of the JSON API."""

    error: str = Field(description="the first problem found, as `<field>: <rule>`")
    errors: list[str] = Field(
        min_length=1,
        max_length=MAX_ERRORS,
        description="every problem found (at most 100), each as `<field>: <rule>`",
    )


class ApiError(Exception):
    """Raised anywhere in a request to answer with `status` in the error shape."""

    def __init__(
        self, status: int, errors: str | Sequence[str], headers: Mapping[str, str] | None = None
    ) -> None:
        self.status = status
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.headers = dict(headers) if headers else None
        super().__init__(self.errors[0] if self.errors else f"HTTP {status}")


def error_body(errors: Sequence[str]) -> dict[str, object]:
    listed = list(errors[:MAX_ERRORS]) or ["request: invalid"]
    return {"error": listed[0], "errors": listed}


def error_response(
    status: int, errors: str | Sequence[str], headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON error answer in the contract's shape."""
    listed = [errors] if isinstance(errors, str) else errors
    return Response(
        _encoder.encode(error_body(listed)),
        status_code=status,
        media_type="application/json",
        headers=dict(headers) if headers else None,
    )


def too_large(limit: int) -> Response:
    """413 for a body read whole past `limit` bytes; the connection closes (the rest of
    the body is not read)."""
    return error_response(413, f"body: at most {limit} bytes", {"Connection": "close"})


_DESCRIPTIONS = {
    400: "invalid input: every problem found, as `<field>: <rule>`",
    401: "missing, unknown or revoked token",
    403: "the token lacks the scope, or asks for another tenant's data",
    404: "no such resource",
    405: "method not allowed; `Allow` lists the allowed ones",
    409: "conflict with the resource's state",
    413: "the body is too large",
    415: "unsupported content type or encoding",
    500: "internal error (no details are given)",
    503: "temporarily unavailable; retry after `Retry-After` seconds",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for `statuses`, each with the `Error` schema, for a
    route decorator: `@router.get(..., responses=error_responses(401, 403))`."""
    return {
        status: {"model": Error, "description": _DESCRIPTIONS.get(status, "error")}
        for status in statuses
    }


# Texts for FastAPI's request validation errors.

_NAMED = re.compile(r"^[A-Za-z_][\w.\[\]]*: ")
_LOCATIONS = ("body", "query", "path", "header", "cookie")


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "body"


def validation_messages(errors: Iterable[Mapping[str, Any]]) -> list[str]:
    """`<field>: <rule>` for each of pydantic's errors (`loc` names the field).

    A validator that names its own field (`tenant_id: only ...`) keeps its text; JSON that
    does not parse is reported on `body`."""
    messages = []
    for error in errors:
        if error.get("type") == "json_invalid":
            messages.append("body: not valid JSON")
            continue
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        field = _field(tuple(error.get("loc", ())))
        named = field == "body" and _NAMED.match(message) is not None
        messages.append(
            message if named or message.startswith(f"{field}:") else f"{field}: {message}"
        )
        if len(messages) >= MAX_ERRORS:
            break
    return messages


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(routes: Iterable[BaseRoute], scope: Scope) -> list[str]:
    """Every method some route serves on this request's path, for `Allow` on a 405
    (the router's own 405 names only the first route that matched the path)."""
    routes = list(routes)
    return [
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in routes)
    ]


def http_error_messages(status: int, detail: object, method: str, path: str) -> list[str]:
    """The error-shape text for an HTTPException (Starlette's own 404/405 carry only the
    status phrase as detail)."""
    if status == 404 and detail == "Not Found":
        return [f"path: no endpoint {path}"]
    if status == 405 and detail == "Method Not Allowed":
        return [f"method: {method} is not allowed on {path}"]
    if isinstance(detail, str):
        return [detail if _NAMED.match(detail) else f"request: {detail}"]
    if isinstance(detail, list) and all(isinstance(d, str) for d in detail):
        return list(detail)
    return [f"request: HTTP {status}"]


# The OpenAPI schema.

_VALIDATION_COMPONENTS = ("HTTPValidationError", "ValidationError")


def conform_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Document the error shape in FastAPI's schema, in place (idempotent): FastAPI's
    default 422 entries become 400 with the `Error` schema, and its validation-error
    components go."""
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault(
                    "400",
                    {
                        "description": _DESCRIPTIONS[400],
                        "content": {"application/json": {"schema": error_ref}},
                    },
                )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in _VALIDATION_COMPONENTS:
        components.pop(name, None)
    components.setdefault("Error", Error.model_json_schema())
    return schema
