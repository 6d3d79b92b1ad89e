"""Client library a rerank gateway embeds to ship usage events and uptime probes to metering.

Why this package exists
-----------------------
Every rerank call the gateway proxies is billable: an event that never reaches the metering
service is lost revenue, an event counted twice is an overcharge, and the gateway must neither
slow down nor fail because metering is slow or down.  Doing this correctly at every call site is
hard, so it lives here, once:

* ``send`` only encodes the record and appends it to an in-memory buffer; a background worker
  (a thread for :class:`MeteringClient`, an asyncio task for :class:`AsyncMeteringClient`) posts
  batches to ``POST /v1/events`` / ``POST /v1/probes`` when a batch is full or its oldest record
  is older than ``flush_interval``.  Batches keep arrival order and stay under the server limits
  (10,000 records, 16 MiB).
* A batch that fails transiently (5xx, 429, timeouts, dropped connections) is retried *byte for
  byte* -- same ``event_id`` values, same body -- with exponential backoff, full jitter and
  ``Retry-After``.  The server deduplicates on ``event_id``/``probe_id``, so at-least-once
  delivery plus idempotent ingestion yields exactly-once counting.  The client never invents ids.
* Nothing is dropped silently.  A full buffer either blocks ``send`` (``on_full="block"``) or
  spills to fsync'd NDJSON files (``on_full="spill"``) that are replayed -- also by the next
  client started on the same ``spill_dir`` after a crash -- and deleted only once acknowledged.
  Records the server refuses (400/401/403, oversized single records, per-record ``rejected``
  entries of a 202) are handed to the ``on_error`` dead-letter callback (default: ERROR log).

Design: every decision (batching, ordering, 413 splitting, retry/backoff, spill files, flush
accounting, counters) lives in the I/O-free core (``core.py``, working on the queues of
``streams.py``; the spill files' I/O is in ``spill.py``).  The two public clients are thin
front-ends that add only locking/waiting and the HTTP call (``sync.py``: ``httpx.Client`` in a
thread; ``aio.py``: ``httpx.AsyncClient`` in a task).  The package imports nothing else of
``metering`` and nothing but the standard library, httpx and msgspec: a gateway installs it
alone (``pip install rerank-metering``), without the server's extra.

Limits worth knowing: records still in memory are lost if the process dies abruptly (use
``on_full="spill"`` plus ``close()`` on shutdown; ``close(timeout=...)`` writes what it could not
deliver to ``spill_dir`` when one is configured); one ``spill_dir`` belongs to one live client
(enforced with an ``flock``); ``on_error`` runs on the worker and must not block or call
``flush``/``close``.
"""

from metering.client.aio import AsyncMeteringClient
from metering.client.records import (
    DEFAULT_MAX_BATCH_BYTES,
    SERVER_MAX_BYTES,
    SERVER_MAX_RECORDS,
    DeadLetter,
    ErrorCallback,
    Kind,
    OnFull,
)
from metering.client.sync import MeteringClient

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "SERVER_MAX_BYTES",
    "SERVER_MAX_RECORDS",
    "AsyncMeteringClient",
    "DeadLetter",
    "ErrorCallback",
    "Kind",
    "MeteringClient",
    "OnFull",
]
