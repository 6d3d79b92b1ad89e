"""The queues the core works on: per record kind, a FIFO of formed batches, leftover spill
files, records in memory and this run's spill files; and a batch, the unit that is posted,
retried byte for byte, and resolved."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from metering.client.records import Item, Kind
from metering.client.spill import SpillFile, SpillWriter


@dataclass(slots=True)
class SpillOrigin:
    path: Path
    outstanding: int  # batches from this file not yet resolved; file deleted at 0
    recovered: bool  # left by a previous run (older than anything in memory)


@dataclass(slots=True, eq=False)
class Batch:
    kind: Kind
    items: list[Item]
    body: bytes
    from_memory: bool
    origin: SpillOrigin | None
    failures: int = 0
    not_before: float = 0.0


class Stream:
    """FIFO of one record kind: formed batches, recovered files, memory, this run's spill files."""

    def __init__(self, kind: Kind) -> None:
        self.kind: Kind = kind
        self.prefix = b'{"' + kind.encode() + b'":['
        self.overhead = len(self.prefix) + 2  # prefix + b"]}"
        self.formed: deque[Batch] = deque()
        self.recovered: deque[SpillFile] = deque()
        self.memory: deque[tuple[Item, float]] = deque()
        self.memory_bytes = 0  # sum of len(data) + 1 (comma)
        self.spill_files: deque[SpillFile] = deque()
        self.spill_open: SpillWriter | None = None
        self.enqueued = 0  # records handed over (incl. recovered), monotonic
        self.resolved = 0  # records acknowledged or dead-lettered, monotonic, FIFO
        self.force_upto = 0  # a flush() waits until resolved >= this

    def spill_pending(self) -> bool:
        return bool(self.spill_files) or self.spill_open is not None

    def body(self, items: Sequence[Item]) -> bytes:
        return self.prefix + b",".join(i.data for i in items) + b"]}"

    def idle(self) -> bool:
        return not (self.formed or self.recovered or self.memory or self.spill_pending())
