"""HTTP routes, one module per area; `ROUTERS` collects them for the app factory."""

from __future__ import annotations

from fastapi import APIRouter

from metering.api import health, ingest, keys

ROUTERS: list[APIRouter] = [health.router, keys.router, ingest.router]
