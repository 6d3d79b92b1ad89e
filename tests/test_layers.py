"""The direction of imports between the project's layers, read from the code itself.

`billing` is domain logic that never imports `metering`; the gateway client
(`metering.client`) imports nothing else of `metering`, so a gateway can install it alone;
`metering.app` and `metering.cli` are the top layers, which nothing below imports; the ingest
pipeline takes its ClickHouse client as a parameter, so it imports no store module (the
ClickHouse and relational factories) and no module of the app. Every import counts, also
the ones under `if TYPE_CHECKING:` and inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_under(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def imported_names(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in the file; `from a import b` yields a and a.b."""
    own = module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in paths
        for line, name in imported_names(path)
        if any(within(name, f) for f in forbidden)
    ]


def test_the_import_reader_sees_the_forms_the_rules_depend_on(tmp_path: Path) -> None:
    """Guards the guard: a reader that missed relative or lazy imports would pass anything."""
    sample = tmp_path / "metering" / "client" / "probe.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import core\n"
        "from .. import settings\n"
        "if TYPE_CHECKING:\n"
        "    import metering.app\n"
        "def f() -> None:\n"
        "    from metering.cli import main\n"
    )
    names = {name for _, name in imported_names(sample, tmp_path)}
    assert {"metering.client.core", "metering.settings", "metering.app", "metering.cli.main"} <= (
        names
    )


def test_billing_source_never_imports_metering() -> None:
    assert offenders(modules_under("billing"), ("metering",)) == []


def test_importing_all_of_billing_loads_no_metering_module() -> None:
    script = (
        "import importlib, json, pkgutil, sys\n"
        "import billing\n"
        "for info in pkgutil.walk_packages(billing.__path__, 'billing.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if m == 'metering' or m.startswith('metering.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_the_gateway_client_imports_nothing_else_of_metering() -> None:
    paths = modules_under("metering.client")
    assert len(paths) > 1, "metering.client is a package"
    outside = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in paths
        for line, name in imported_names(path)
        if within(name, "metering") and not within(name, "metering.client")
    ]
    assert outside == []


def test_the_gateway_client_needs_only_the_stdlib_httpx_and_msgspec() -> None:
    allowed = set(sys.stdlib_module_names) | {"httpx", "msgspec", "metering"}
    foreign = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in modules_under("metering.client")
        for line, name in imported_names(path)
        if name.split(".")[0] not in allowed
    ]
    assert foreign == []


@pytest.mark.parametrize("top", ["metering.app", "metering.cli"])
def test_nothing_below_the_top_layers_imports_them(top: str) -> None:
    # cli is the very top (it builds the app); app sits under cli only.
    above = {"metering.app": {"metering.cli", "metering.app"}, "metering.cli": {"metering.cli"}}
    below = [p for p in modules_under("metering") if module_name(p) not in above[top]]
    assert offenders(below, (top,)) == []


STORE_AND_APP = (
    "metering.clickhouse",
    "metering.db",
    "metering.services",
    "metering.auth.deps",
    "metering.db.deps",
    "metering.app",
    "metering.cli",
    "metering.scheduler",
)


def test_the_ingest_pipeline_imports_no_store_or_app_module() -> None:
    """ingest takes its clients as parameters. Its HTTP edge (routes.py) gets the services
    through the app's dependencies, and is held only to never import the top layers."""
    pipeline = [p for p in modules_under("metering.ingest") if p.name != "routes.py"]
    assert len(pipeline) > 3
    assert offenders(pipeline, STORE_AND_APP) == []
    routes = ROOT / "metering" / "ingest" / "routes.py"
    assert offenders([routes], ("metering.app", "metering.cli")) == []


def test_no_route_or_dependency_module_imports_the_composition_root() -> None:
    """Routes and their dependencies name what they need of the running service as a
    Protocol (IngestState, AuthState, ...); only the layers above it (app, cli, scheduler,
    jobs, the demo hook) import metering.services."""
    edge = [p for p in modules_under("metering") if p.name in ("routes.py", "deps.py")]
    assert len(edge) >= 5
    assert offenders(edge, ("metering.services", "metering.app", "metering.cli")) == []
