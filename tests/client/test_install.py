"""A gateway installs the client alone (`pip install rerank-metering`): it must work without
the server's packages, and the server must say which extra it needs when they are missing.

The subprocesses below put a finder first on `sys.meta_path` that refuses every package the
`server` extra brings, as if they were not installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Import names of what the `server` extra installs (and of what those pull in).
SERVER_PACKAGES = (
    "chdb",
    "clickhouse_connect",
    "fastapi",
    "starlette",
    "sqlalchemy",
    "alembic",
    "uvicorn",
    "uvloop",
    "httptools",
    "numpy",
    "pydantic",
    "pydantic_settings",
    "psycopg",
    "prometheus_client",
    "apscheduler",
    "stripe",
    "grafana_client",
)

BLOCK = f"""
import sys

BLOCKED = {SERVER_PACKAGES!r}


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


def run_without_server_packages(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_really_hides_the_server_packages() -> None:
    out = run_without_server_packages("import fastapi\n")
    assert out.returncode != 0
    assert "No module named 'fastapi'" in out.stderr


def test_client_imports_and_runs_without_the_server_packages() -> None:
    code = """
import asyncio, json
from metering.client import AsyncMeteringClient, DeadLetter, MeteringClient

dead = []
client = MeteringClient(
    "http://127.0.0.1:9", "key", max_retries=0, backoff_base=0.0, timeout=1.0,
    on_error=dead.append,
)
client.send({"event_id": "e-1", "tenant_id": "t"})
assert client.flush(timeout=30), "flush timed out"
client.close(timeout=10)


async def main() -> None:
    async with AsyncMeteringClient("http://127.0.0.1:9", "key", max_retries=0) as aio:
        await aio.send_probe({"probe_id": "p-1"})
        assert await aio.flush(timeout=30), "async flush timed out"


asyncio.run(main())
print(json.dumps({
    "dead": [[d.kind, d.reason, len(d.records)] for d in dead],
    "dead_letter_type": DeadLetter.__name__,
    "loaded": sorted(
        m for m in sys.modules
        if m.split(".")[0] in BLOCKED
        or (m.startswith("metering.") and not m.startswith("metering.client"))
    ),
}))
"""
    out = run_without_server_packages(code)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    # Port 9 refuses the connection: with max_retries=0 the event is dead-lettered, which
    # proves the whole send path (core, worker, HTTP) ran.
    assert result["dead"] == [["events", "retries_exhausted", 1]]
    assert result["loaded"] == []


def test_server_command_names_the_extra_when_its_packages_are_missing() -> None:
    code = "from metering.cli import main\nsys.exit(main(['serve']))\n"
    out = run_without_server_packages(code)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [
        "metering: the server needs the [server] extra: pip install 'rerank-metering[server]'"
    ]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_base_install_is_the_client_and_the_server_is_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"]) == {"httpx", "msgspec"}
    extras = project["optional-dependencies"]
    assert {"fastapi", "uvicorn", "chdb", "clickhouse-connect", "sqlalchemy", "numpy"} <= _names(
        extras["server"]
    )
    assert "rerank-metering[server]" in extras["dev"]
