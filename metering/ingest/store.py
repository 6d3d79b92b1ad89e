"""ClickHouse statements of the ingest path, per stream (events, probes).

Values are always bound as server-side parameters; table and column names come only
from the constants below. Rows are inserted with an explicit column list, the fields of
the stream's Struct: a valid batch goes to ClickHouse as the gateway sent it, and any
other key in it (`ingested_at`, a server-side column, or anything unknown) is skipped by
ClickHouse instead of being stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
from clickhouse_connect.driver.client import Client

from metering.ingest.structs import Event, Probe

IDS_TABLE = "ingested_ids"
_ids_encoder = msgspec.json.Encoder()

EXISTING_IDS = (
    "SELECT id FROM ingested_ids WHERE stream = {stream:String} AND id IN {ids:Array(String)}"
)
COUNT_IDS = "SELECT count() FROM ingested_ids WHERE stream = {stream:String}"
ID_HASHES = (
    "SELECT reinterpretAsUInt64(substring(MD5(id), 1, 8)) AS h1,"
    " reinterpretAsUInt64(substring(MD5(id), 9, 8)) AS h2"
    " FROM ingested_ids WHERE stream = {stream:String}"
)


@dataclass(frozen=True)
class StreamTable:
    stream: str
    table: str
    id_column: str
    # Which of {ids} are already in the main table; the rows' time range bounds the scan.
    existing_in_table: str
    # The columns a client may set: the stream's Struct fields, nothing else.
    columns: tuple[str, ...]


EVENTS_TABLE = StreamTable(
    "events",
    "rerank_events",
    "event_id",
    "SELECT event_id FROM rerank_events"
    " WHERE toDate(timestamp) IN {days:Array(Date)} AND event_id IN {ids:Array(String)}",
    Event.__struct_fields__,
)
PROBES_TABLE = StreamTable(
    "probes",
    "uptime_probes",
    "probe_id",
    "SELECT probe_id FROM uptime_probes"
    " WHERE toDate(timestamp) IN {days:Array(Date)} AND probe_id IN {ids:Array(String)}",
    Probe.__struct_fields__,
)


class IngestStore:
    """The ClickHouse side of one stream's ingest."""

    def __init__(self, client: Client, table: StreamTable, reader: Client | None = None) -> None:
        # `client` writes (the writer thread); `reader` answers the gate's lookups on the
        # request path, so a long insert never stalls a request.
        self.client = client
        self.reader = reader or client
        self.table = table

    def existing_ids(self, ids: list[str]) -> set[str]:
        """Exact: which of `ids` were ever stored (the gate's last layer)."""
        if not ids:
            return set()
        rows = self.reader.query(
            EXISTING_IDS, parameters={"stream": self.table.stream, "ids": ids}
        ).result_rows
        return {row[0] for row in rows}

    def existing_in_table(self, ids: list[str], times: list[datetime]) -> set[str]:
        """Which of `ids` are in the main table (used when replaying after a failure)."""
        if not ids:
            return set()
        # toDate(timestamp) is the UTC day: an event at 20:00-05:00 is stored under the
        # next day, so the days must be taken in UTC too.
        days = sorted({t.astimezone(UTC).date() for t in times})
        rows = self.client.query(
            self.table.existing_in_table, parameters={"ids": ids, "days": days}
        ).result_rows
        return {row[0] for row in rows}

    def count_ids(self) -> int:
        rows = self.client.query(COUNT_IDS, parameters={"stream": self.table.stream})
        return int(rows.result_rows[0][0])

    def id_hashes(self) -> Iterator[npt.NDArray[np.uint64]]:
        """The MD5 halves of every stored id, in blocks (for the gate's Bloom filter)."""
        with self.reader.query_np_stream(
            ID_HASHES, parameters={"stream": self.table.stream}
        ) as stream:
            for block in stream:
                yield np.ascontiguousarray(
                    np.column_stack([block[:, 0], block[:, 1]]).astype(np.uint64)
                )

    def insert_rows(self, ndjson: bytes, settings: dict[str, Any] | None = None) -> None:
        if ndjson:
            self.client.raw_insert(
                self.table.table,
                self.table.columns,
                ndjson,
                fmt="JSONEachRow",
                settings=settings,
            )

    def insert_ids(self, ids: list[str]) -> None:
        if ids:
            # JSONColumns encoded by msgspec: no per-value Python work in the driver.
            payload = _ids_encoder.encode({"stream": [self.table.stream] * len(ids), "id": ids})
            self.client.raw_insert(IDS_TABLE, ["stream", "id"], payload, fmt="JSONColumns")
