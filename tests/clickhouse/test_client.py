"""The ClickHouse client factory: chDB inserts leave no temporary files behind.

clickhouse-connect's chDB backend writes each insert's payload to a temporary file in the
system temp dir and inserts it `FROM INFILE`; a killed process leaves those files there.
Our chDB clients stream the payload into the engine instead (chdb's `send_insert`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from metering.clickhouse.client import make_client

TABLE = (
    "CREATE TABLE t (id String, n UInt32, at DateTime64(3, 'UTC')) ENGINE = MergeTree ORDER BY id"
)


def test_streamed_inserts_keep_settings_columns_and_native_blocks(
    chdb_path: Path, ch_database: str
) -> None:
    client = make_client(f"chdb://{chdb_path}", ch_database)
    client.command(TABLE)
    client.raw_insert(
        "t",
        None,
        b'{"id":"a","n":1,"at":"2026-01-02T03:04:05+02:00"}\n{"id":"b","n":2,"at":"2026-01-02T00:00:00Z"}',
        fmt="JSONEachRow",
    )
    client.raw_insert("t", ["id", "n"], b'{"id":"c","n":3}', fmt="JSONEachRow")
    client.insert("t", [["d", 4], ["e", 5]], column_names=["id", "n"])
    rows = client.query("SELECT id, n, toString(at) FROM t ORDER BY id").result_rows
    assert rows == [
        ("a", 1, "2026-01-02 01:04:05.000"),  # best_effort parsing of the offset applies
        ("b", 2, "2026-01-02 00:00:00.000"),
        ("c", 3, "1970-01-01 00:00:00.000"),
        ("d", 4, "1970-01-01 00:00:00.000"),
        ("e", 5, "1970-01-01 00:00:00.000"),
    ]


def test_a_refused_insert_stores_nothing_and_the_client_keeps_working(
    chdb_path: Path, ch_database: str
) -> None:
    client = make_client(f"chdb://{chdb_path}", ch_database)
    client.command(TABLE)
    with pytest.raises(Exception, match=r"(?i)cannot parse|incorrect"):
        client.raw_insert("t", None, b'{"id":"x","n":1}\n{"id":"y","n":"nope"}', fmt="JSONEachRow")
    client.raw_insert("t", None, b'{"id":"z","n":7}', fmt="JSONEachRow")
    assert client.query("SELECT id FROM t").result_rows == [("z",)]


def test_an_insert_whose_part_cannot_be_written_raises(chdb_path: Path, ch_database: str) -> None:
    # chdb 4.4's streaming insert reports the rows as written when writing the part fails
    # after parsing (here: a projection the engine cannot compute). Trusting it would let
    # the ingest writer drop spooled events that were never stored.
    client = make_client(f"chdb://{chdb_path}", ch_database)
    client.command(
        "CREATE TABLE p (id String, fb Array(Tuple(provider String, x UInt8)),"
        " PROJECTION bad (SELECT id, sumMap(fb.provider, arrayWithConstant(length(fb), 1))"
        " GROUP BY id)) ENGINE = MergeTree ORDER BY id"
    )
    with pytest.raises(Exception, match="table grew by 0"):
        client.raw_insert(
            "p", ["id", "fb"], b'{"id":"a","fb":[{"provider":"x","x":1}]}', fmt="JSONEachRow"
        )
    with pytest.raises(Exception, match="table grew by 0"):
        client.insert("p", [["b", []]], column_names=["id", "fb"])
    assert client.query("SELECT count() FROM p").result_rows == [(0,)]


KILLED_MID_INSERT = """
import os, signal, sys
from metering.clickhouse.client import make_client
client = make_client("chdb://" + sys.argv[1], "default")
client.command("CREATE TABLE t (id String) ENGINE = MergeTree ORDER BY id")
def rows():
    yield b'{"id":"a"}\\n' * 10_000
    os.kill(os.getpid(), signal.SIGKILL)  # killed while the insert is under way
    yield b'{"id":"b"}'
client.raw_insert("t", None, rows(), fmt="JSONEachRow")
"""


def test_a_process_killed_mid_insert_leaves_no_file_in_the_temp_dir(tmp_path: Path) -> None:
    watched = tmp_path / "system-tmp"
    watched.mkdir()
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", KILLED_MID_INSERT, str(tmp_path / "chdb")],
        cwd=repo,
        env={**os.environ, "TMPDIR": str(watched)},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert list(watched.iterdir()) == []


def test_http_urls_need_a_known_scheme() -> None:
    with pytest.raises(ValueError, match="unsupported scheme"):
        make_client("ftp://127.0.0.1/x")
