"""Typed settings: every `METERING_*` variable of the contract, read once.

Nothing else in the code base reads `os.environ`; the settings object is built by the
CLI (or a test) and passed down.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class Settings(BaseSettings):
    """Service settings (environment variables `METERING_*`, optional `.env`)."""

    model_config = SettingsConfigDict(env_prefix="METERING_", env_file=".env", extra="ignore")

    data_dir: Path = Path("./data")
    clickhouse_url: str | None = None
    clickhouse_database: str = "default"
    database_url: str | None = None
    admin_token: str | None = None
    invoice_grace_days: int = Field(default=1, ge=0)
    probe_targets: str | None = None
    webhook_allow_private: bool = False
    smtp_url: str | None = None  # smtp://user:pass@host:587 (STARTTLS if offered) or smtps://
    smtp_from: str | None = None
    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None

    # Ingest tuning (not in the contract's table; documented in the README).
    spool_max_bytes: int = Field(default=2 * 1024**3, ge=1024 * 1024)
    spool_fsync: Literal["always", "never"] = "always"
    probe_interval_seconds: float = Field(default=30.0, gt=0)
    # Request bodies held at once by the ingest endpoints (read + decompressed).
    ingest_body_budget_bytes: int = Field(default=256 * 1024**2, ge=1024 * 1024)
    # HTTP connection limits (metering.http.protocol): request head size, idle keep-alive,
    # head deadline from its first byte, body stall (no byte while the server reads).
    http_max_header_bytes: int = Field(default=64 * 1024, ge=8 * 1024)
    http_keep_alive_seconds: float = Field(default=5.0, gt=0)
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    http_body_timeout_seconds: float = Field(default=15.0, gt=0)
    # A second port answering only POST /v1/authorize, from its own process (0: none);
    # see metering.budgets.replica.
    authorize_port: int = Field(default=0, ge=0, le=65535)
    # Its CPU priority (nice, -20..19; below 0 needs CAP_SYS_NICE, else it stays at 0).
    authorize_nice: int = Field(default=-5, ge=-20, le=19)
    # Its CPU time slice in microseconds (Linux 6.12+: a shorter slice lets a woken check
    # run before the slice of a busy ingest thread ends; 100-100,000; 0 = the kernel's).
    # Off by default: 100 us made no difference measurable on two cores (bench/RESULTS.md).
    authorize_slice_us: int = Field(default=0, ge=0, le=100_000)
    # Its real-time priority (SCHED_RR, 1-99; 0 = off, the default; needs CAP_SYS_NICE,
    # else it stays as it is with a warning). A check then runs as soon as it arrives,
    # ahead of every ingest thread; a flood of checks takes its core from ingest (about
    # what nice -5 gives it: measured in docs/budgets.md). Opt-in: for a gateway whose
    # authorize SLO matters more.
    authorize_realtime_priority: int = Field(default=0, ge=0, le=99)

    @field_validator("authorize_slice_us")
    @classmethod
    def _slice_in_kernel_range(cls, value: int) -> int:
        if value and not 100 <= value <= 100_000:
            raise ValueError("must be 0 (the kernel's) or 100-100000 microseconds")
        return value

    @field_validator("clickhouse_database")
    @classmethod
    def _valid_identifier(cls, value: str) -> str:
        if not _IDENT.match(value):
            raise ValueError("must be a ClickHouse identifier: [A-Za-z_][A-Za-z0-9_]{0,63}")
        return value

    @property
    def resolved_clickhouse_url(self) -> str:
        """`chdb://<data dir>/clickhouse` unless a URL was given."""
        if self.clickhouse_url:
            return self.clickhouse_url
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    @property
    def resolved_database_url(self) -> str:
        """`sqlite:///<data dir>/metering.db` unless a URL was given."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'metering.db').resolve()}"

    @property
    def uses_chdb(self) -> bool:
        return self.resolved_clickhouse_url.startswith("chdb://")
