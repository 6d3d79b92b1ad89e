"""The one error shape of the JSON API (shared/CONTRACT.md, "Errors").

Every 4xx and 5xx answer under `/v1/` has the body
`{"error": "<field>: <rule>", "errors": ["<field>: <rule>", ...]}`: `errors` lists every
problem found (at most 100), `error` is the first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
from starlette.responses import Response

MAX_ERRORS = 100

_encoder = msgspec.json.Encoder()


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
