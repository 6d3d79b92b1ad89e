"""`POST /v1/prices` (admin) and `GET /v1/prices`: the versioned price book.

Prices are decimal strings, validated exactly (never through a float): non-negative,
at most 12 digits after the point and 18 in all. An entry is never edited: a change is
a new entry with its own `effective_from`. Posting the same entry again answers 200
with it (a retried request); other prices at the same (provider, model,
effective_from) are a 409.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from fastapi import APIRouter, Response
from pydantic import AwareDatetime, BaseModel, Field, StringConstraints, field_validator

from billing.prices.book import NewPrice, PriceConflict, add_price, list_prices
from metering.analytics.deps import AnalyticsStateDep
from metering.analytics.service import price_out
from metering.auth.deps import Admin, Reader
from metering.db.deps import SessionDep
from metering.errors import ApiError, error_responses

router = APIRouter(prefix="/v1/prices", tags=["prices"])

_PRICE = re.compile(r"^\d{1,18}(\.\d{1,12})?$")
PriceText = Annotated[
    str,
    Field(
        description='a non-negative decimal string, e.g. "0.25" (at most 12 decimals)',
        pattern=_PRICE.pattern,
        max_length=31,
    ),
]


class PriceIn(BaseModel):
    provider: Annotated[
        str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")
    ]
    model: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]
    effective_from: AwareDatetime
    currency: Annotated[str, Field(pattern=r"^USD$", description="USD (the only currency yet)")] = (
        "USD"
    )
    input_per_1m_tokens: PriceText
    output_per_1m_tokens: PriceText = "0"
    per_1k_doc_query_pairs: PriceText = "0"

    @field_validator("effective_from", mode="before")
    @classmethod
    def _text(cls, value: object) -> object:
        # An RFC 3339 string with an offset, never a number read as epoch seconds.
        if not isinstance(value, str):
            raise ValueError("must be an RFC 3339 time string with an offset")
        return value


class PriceOut(BaseModel):
    id: str
    provider: str
    model: str
    effective_from: str
    currency: str
    input_per_1m_tokens: str
    output_per_1m_tokens: str
    per_1k_doc_query_pairs: str


class PriceList(BaseModel):
    prices: list[PriceOut]


def _decimal(field: str, text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ApiError(400, f"{field}: must be a decimal string") from None
    if not value.is_finite() or value < 0:
        raise ApiError(400, f"{field}: must be a non-negative decimal")
    return value


@router.post(
    "",
    status_code=201,
    response_model=PriceOut,
    responses={
        200: {"description": "the same entry was posted before"},
        **error_responses(400, 401, 403, 409),
    },
)
def post_price(
    body: PriceIn, session: SessionDep, state: AnalyticsStateDep, response: Response, _: Admin
) -> dict[str, Any]:
    new = NewPrice(
        provider=body.provider,
        model=body.model,
        effective_from=body.effective_from.replace(
            microsecond=body.effective_from.microsecond // 1000 * 1000
        ),
        currency=body.currency,
        input_per_1m_tokens=_decimal("input_per_1m_tokens", body.input_per_1m_tokens),
        output_per_1m_tokens=_decimal("output_per_1m_tokens", body.output_per_1m_tokens),
        per_1k_doc_query_pairs=_decimal("per_1k_doc_query_pairs", body.per_1k_doc_query_pairs),
    )
    try:
        entry, created = add_price(session, new)
    except PriceConflict as exc:
        raise ApiError(409, str(exc)) from None
    session.commit()
    state.prices.invalidate()
    if not created:
        response.status_code = 200
    return price_out(entry)


@router.get("", response_model=PriceList, responses=error_responses(401, 403))
def get_prices(session: SessionDep, _: Reader) -> dict[str, Any]:
    return {"prices": [price_out(p) for p in list_prices(session)]}
