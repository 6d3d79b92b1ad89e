"""One factory for ClickHouse clients over clickhouse-connect.

`chdb://PATH` opens embedded ClickHouse (chDB) in this process; `http(s)://user:pass@
host:port/db` reaches a server or cluster. The same SQL runs on both.

chDB inserts are streamed into the engine. clickhouse-connect's chDB backend writes every
insert's payload to a temporary file in the system temp dir and inserts it `FROM INFILE`:
one more copy of every row on the ingest path, and a process killed mid-insert leaves the
file behind. chdb (4.x) takes an INSERT's bytes directly (`Connection.send_insert`), so
our chDB clients hand the payload over in memory and no temporary file exists at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver._backend import chdb_backend
from clickhouse_connect.driver._backend.chdb_backend import ChdbBackend
from clickhouse_connect.driver._backend.models import QueryRuntime
from clickhouse_connect.driver._chdbclient import ChdbClient
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    NotSupportedError,
    ProgrammingError,
)
from clickhouse_connect.driver.insert import InsertContext

QUERY_SETTINGS: dict[str, Any] = {
    # Parse RFC 3339 timestamps with offsets on insert.
    "date_time_input_format": "best_effort",
}

SCHEMES = ("chdb", "http", "https")
_CREATED: set[tuple[str, str]] = set()  # chDB (path, database) pairs this process created


def forget_database(url: str, database: str) -> None:
    """After `DROP DATABASE`: the next client on it creates it again."""
    parts = urlsplit(url)
    _CREATED.discard((unquote(parts.netloc + parts.path), database))


def check_url(url: str) -> None:
    """Raise ValueError for a URL no client can be made for (a configuration error,
    worth failing at once, unlike an unreachable server, which is worth retrying)."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(
            f"METERING_CLICKHOUSE_URL: unsupported scheme {scheme!r}; "
            "use chdb://PATH or http(s)://user:pass@host:port/db"
        )


def make_client(url: str, database: str = "default") -> Client:
    """Open a client on `database` (created if missing) at `url`."""
    check_url(url)
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        path = unquote(parts.netloc + parts.path)
        if (path, database) not in _CREATED:
            bootstrap = StreamingChdbClient(path=path)
            try:
                bootstrap.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
            finally:
                bootstrap.close()
            # chDB is in this process: a database made here stays until this process
            # drops it (tests do, through `forget_database`).
            _CREATED.add((path, database))
        return StreamingChdbClient(path=path, database=database, settings=QUERY_SETTINGS)
    db_in_url = parts.path.strip("/") or None
    target = database if database != "default" or db_in_url is None else db_in_url
    common: dict[str, Any] = {
        "host": parts.hostname or "localhost",
        "port": parts.port or (8443 if parts.scheme == "https" else 8123),
        "username": unquote(parts.username or "default"),
        "password": unquote(parts.password or ""),
        "secure": parts.scheme == "https",
        # Each client runs one query at a time; a session id would make a server refuse
        # a second concurrent query on it, and every purpose gets its own client anyway.
        "autogenerate_session_id": False,
    }
    bootstrap_http = clickhouse_connect.get_client(**common)
    try:
        bootstrap_http.command(f"CREATE DATABASE IF NOT EXISTS `{target}`")
    finally:
        bootstrap_http.close()
    return clickhouse_connect.get_client(**common, database=target, settings=QUERY_SETTINGS)


class StreamingChdbClient(ChdbClient):
    """A chDB client whose inserts stream into the engine (no temporary file)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # ChdbClient builds its backend itself; only the two insert methods differ, so
        # the instance takes the subclass (same state, no second engine handle).
        if type(self._backend) is ChdbBackend:
            self._backend.__class__ = StreamingChdbBackend


class StreamingChdbBackend(ChdbBackend):
    """`ChdbBackend` with inserts through chdb's `send_insert` instead of INFILE."""

    def execute_data_insert(
        self,
        context: InsertContext,
        runtime: QueryRuntime,
        body: Any,
        retry_body: Any,
    ) -> dict[str, Any]:
        if isinstance(context.compression, str):
            raise NotSupportedError("Insert compression is not supported by the chdb backend")
        columns = ", ".join(quote_identifier(name) for name in context.column_names)
        # build_insert puts the statement before the first Native chunk (for HTTP).
        prefix = f"INSERT INTO {context.table} ({columns}) FORMAT Native\n".encode()

        def chunks() -> Iterator[bytes]:
            first = True
            for chunk in body:
                if context.insert_exception is not None:
                    error = context.insert_exception
                    context.insert_exception = None
                    raise error
                if first:
                    first = False
                    if chunk.startswith(prefix):
                        chunk = chunk[len(prefix) :]
                    else:
                        newline = chunk.find(b"\n")
                        chunk = chunk[newline + 1 :] if newline >= 0 else chunk
                yield chunk

        statement = f"INSERT INTO {context.table} ({columns})"
        return self._stream(statement, "Native", chunks(), runtime, context.table)

    def execute_raw_insert(
        self,
        table: str | None,
        column_names: Sequence[str] | None,
        insert_block: Any,
        fmt: str,
        compression: str | None,
        runtime: QueryRuntime,
        transport_settings: dict[str, str] | None,
    ) -> dict[str, Any]:
        if not table:
            raise ProgrammingError("The chdb backend requires a table name")
        if insert_block is None:
            raise ProgrammingError("No insert block provided for raw_insert")
        chunks: Iterable[bytes] = _chunks(insert_block)
        if compression and compression != "identity":
            chunks = [chdb_backend._decompress(b"".join(chunks), compression)]
        columns = ""
        if column_names:
            columns = f" ({', '.join(quote_identifier(name) for name in column_names)})"
        return self._stream(f"INSERT INTO {table}{columns}", fmt, chunks, runtime, table)

    def _rows_locked(self, table: str) -> int:
        # A trivial count: answered from the parts' metadata, not by reading rows.
        result = self._query_locked(f"SELECT count() FROM {table}", "TabSeparated")
        return int(result.bytes().decode().strip() or 0)

    def _stream(
        self,
        statement: str,
        fmt: str,
        chunks: Iterable[bytes],
        runtime: QueryRuntime,
        table: str,
    ) -> dict[str, Any]:
        """Run one INSERT fed by `chunks`, under the handle lock like every call.

        chdb 4.4's streaming insert reports success, with the rows it parsed as
        written, when writing the part fails afterwards (seen with a projection that
        could not be computed; a full disk fails at the same step). A writer that
        trusted that answer would drop spooled events it never stored. So the table's
        row count is read before and after (metadata only, ~1 ms), and an insert after
        which the table grew by fewer rows than reported raises like any failed insert:
        the ingest writer then retries what is missing. Other inserts into the same
        table at the same moment can only hide a failure (the growth is theirs too),
        never invent one; the ingest writer is the only one inserting into its tables.
        """
        settings: Mapping[str, str] = self._engine_settings(runtime.settings)
        if settings:
            statement += f" SETTINGS {chdb_backend._settings_clause(settings)}"
        self._guard()
        with self._handle.lock:
            self._guard_locked()
            self._use_database_locked(runtime.database)
            before = self._rows_locked(table)
            try:
                inserter = self._handle.conn.send_insert(statement, fmt)
            except Exception as exc:
                raise self._wrap_exception(exc) from exc
            try:
                for chunk in chunks:
                    if chunk:
                        _append(self, inserter, chunk)
                try:
                    result = inserter.finish()
                except Exception as exc:
                    raise self._wrap_exception(exc) from exc
            except BaseException:
                inserter.cancel()  # idempotent; no-op once finish() was called
                raise
            grown = self._rows_locked(table) - before
        if grown < result.rows_written:
            raise DatabaseError(
                f"insert into {table}: chDB reported {result.rows_written} rows written but"
                f" the table grew by {grown}; the part was not stored"
            )
        return {
            "written_rows": str(result.rows_written),
            "written_bytes": str(result.bytes_written),
            "elapsed_ns": str(int(result.elapsed * 1_000_000_000)),
        }


def _append(backend: ChdbBackend, inserter: Any, chunk: bytes) -> None:
    try:
        inserter.append(chunk)
    except DatabaseError:
        raise
    except RuntimeError as exc:  # the engine refused the bytes
        raise backend._wrap_exception(exc) from exc


def _chunks(block: Any) -> Iterator[bytes]:
    """The insert block's bytes, for each shape raw_insert accepts."""
    if isinstance(block, bytes | bytearray | memoryview):
        yield bytes(block) if not isinstance(block, bytes) else block
    elif isinstance(block, str):
        yield block.encode()
    elif hasattr(block, "to_pybytes"):
        yield block.to_pybytes()
    elif hasattr(block, "read"):
        while chunk := block.read(16 * 1024 * 1024):
            yield chunk
    else:
        for chunk in block:
            yield bytes(chunk) if isinstance(chunk, bytes | bytearray) else chunk.encode()
