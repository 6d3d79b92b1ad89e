"""What the gateway hands the client and what the client hands back: record kinds, the
server's limits, encoded records and dead letters.

Shared by every module of the client, so it depends on none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

logger = logging.getLogger("metering.client")

Kind = Literal["events", "probes"]
OnFull = Literal["block", "spill"]

SERVER_MAX_RECORDS: Final = 10_000
SERVER_MAX_BYTES: Final = 16 * 1024 * 1024
DEFAULT_MAX_BATCH_BYTES: Final = 8 * 1024 * 1024
KEY_FIELD: Final[dict[Kind, str]] = {"events": "event_id", "probes": "probe_id"}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Records the client will not deliver, handed to ``on_error`` instead of being dropped.

    ``reason`` is one of ``"rejected"`` (per-record ``rejected`` entry of a 202; ``errors`` holds
    the server's messages, one list per record), ``"http_400"``, ``"http_401"``, ``"http_403"``,
    ``"too_large"`` (413 for a single record), ``"retries_exhausted"`` (``max_retries`` hit),
    ``"undelivered_on_close"`` (``close`` timed out and there is no ``spill_dir``) or
    ``"corrupt_spill"`` (an unreadable line in a spill file; ``detail`` holds its start).
    """

    kind: Kind
    reason: str
    records: list[dict[str, Any]]
    status: int | None = None
    errors: list[list[str]] = field(default_factory=list)
    detail: str = ""


ErrorCallback = Callable[[DeadLetter], None]


def log_dead_letter(dl: DeadLetter) -> None:
    """The default ``on_error``: one ERROR line, so nothing is dropped silently."""
    key = KEY_FIELD[dl.kind]
    ids = [str(r.get(key)) for r in dl.records[:5]]
    more = f" (+{len(dl.records) - 5} more)" if len(dl.records) > 5 else ""
    logger.error(
        "metering: dead-lettered %d %s, reason=%s status=%s ids=%s%s errors=%s detail=%s",
        len(dl.records),
        dl.kind,
        dl.reason,
        dl.status,
        ids,
        more,
        dl.errors[:5],
        dl.detail[:500],
    )


@dataclass(slots=True)
class Item:
    """One record as it travels: encoded once at ``send`` time, resent byte for byte."""

    key: str  # event_id / probe_id
    data: bytes  # the record's JSON object


def decode_record(data: bytes) -> dict[str, Any]:
    """An encoded record back as a dict, for a dead letter (never raises)."""
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {"_raw": data[:1000].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {"_raw": obj}
