"""The house's floors and groups (../shared/DESIGN.md, README's Layout), read from
the code's imports (lazy imports inside functions count too):

- floors: common/ imports no client/ or server/ code; client/ and server/ never
  import each other; only the top floor (simulations/: the CLI's dispatch and the
  simulation driver) knows both; no fedtune module imports itself round a cycle;
- server/, by when its code runs: the ServerApp's runtime (server/runtime/) imports
  neither the operator's processes (server/operations/) nor the after-run tools
  (server/tools/); the two of those never import each other; every group may ask
  the run directory's names (server/rundir.py);
- client/: the node process (client/node/) never imports the per-message ClientApp
  Flower spawns (client/node/forwarder.py); of the node, only the worker runs the
  ClientApp's training code (client/app.py); the ClientApp's modules never import
  the node process (client/commands.py, which starts it, is neither).
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
ALLOWED = {  # package -> the fedtune packages it may import
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "simulations": {"common", "client", "server", "simulations"},
}
SERVER_GROUPS = {  # server group -> the server groups it may import
    "runtime": {"runtime", "rundir"},
    "operations": {"operations", "runtime", "rundir"},
    "tools": {"tools", "runtime", "rundir"},
    "rundir": {"rundir"},
    "commands": {"commands", "runtime", "operations", "tools", "rundir"},
}
FORWARDER = "fedtune.client.node.forwarder"
CLIENT_APP = "fedtune.client.app"


def _module_file(dotted: str) -> Path | None:
    """The file of a fedtune module or package (None when there is none)."""
    base = ROOT / dotted.split(".", 1)[1].replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """The fedtune modules a file imports (``fedtune.server.runtime.app``, ...)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fedtune.")}
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("fedtune.") and node.level == 0:
            for alias in node.names:  # `from fedtune.server import rundir`
                sub = f"{node.module}.{alias.name}"
                out.add(sub if _module_file(sub) else node.module)
    return out


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("fedtune", *(parts[:-1] if parts[-1] == "__init__" else parts)))


@functools.cache  # the tree does not change during a test run
def _graph() -> dict[str, set[str]]:
    return {_name(f): _imports(f)
            for p in PACKAGES for f in sorted((ROOT / p).rglob("*.py"))}


def _server_group(mod: str) -> str:
    parts = mod.split(".")
    return parts[2] if len(parts) > 2 else "commands"  # the package's __init__


def _wrong(rule) -> list[str]:  # type: ignore[no-untyped-def]  # a test helper
    return sorted(f"{mod} -> {dep}" for mod, deps in _graph().items()
                  for dep in deps if dep != mod and rule(mod, dep))


@pytest.mark.parametrize("package", PACKAGES)
def test_each_floor_imports_only_downwards(package: str) -> None:
    wrong = _wrong(lambda mod, dep: mod.split(".")[1] == package
                   and dep.split(".")[1] not in ALLOWED[package])
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_server_groups_by_when_they_run() -> None:
    def against(mod: str, dep: str) -> bool:
        return (mod.startswith("fedtune.server.") and dep.startswith("fedtune.server.")
                and _server_group(dep) not in SERVER_GROUPS[_server_group(mod)])

    wrong = _wrong(against)
    assert not wrong, "server groups against the layering:\n" + "\n".join(wrong)
    assert set(map(_server_group, (m for m in _graph() if m.startswith(
        "fedtune.server.")))) >= {"runtime", "operations", "tools", "rundir"}


def test_the_node_process_never_imports_the_per_message_clientapp() -> None:
    node = {m for m in _graph() if m.startswith("fedtune.client.node.")}
    wrong = _wrong(lambda mod, dep: mod in node - {FORWARDER} and dep == FORWARDER)
    runs_the_app = {FORWARDER, "fedtune.client.node.worker"}
    wrong += _wrong(lambda mod, dep: mod in node - runs_the_app and dep == CLIENT_APP)
    wrong += _wrong(lambda mod, dep: mod.startswith("fedtune.client.")
                    and mod not in node | {"fedtune.client.commands"}
                    and dep.startswith("fedtune.client.node"))
    assert not wrong, "the node process and the ClientApp mixed:\n" + "\n".join(wrong)


def test_importing_the_runtime_and_the_node_loads_no_tool_and_no_forwarder() -> None:
    code = ("import sys, fedtune.server.runtime.app, fedtune.client.node.daemon, "
            "fedtune.client.node.worker; print(sorted(m for m in sys.modules if "
            "m.startswith(('fedtune.server.tools', 'fedtune.server.operations', "
            f"'{FORWARDER}'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, timeout=120).stdout.strip()
    assert out == "[]", out


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            if dep not in graph or dep == mod:
                continue
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[mod] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_rules_catch_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from fedtune.client.trainer import train_local\n"
                   "    from fedtune.server import rundir\n")
    assert _imports(bad) == {"fedtune.client.trainer", "fedtune.server.rundir"}
    assert "client" not in ALLOWED["server"] and "server" not in ALLOWED["client"]
    assert "tools" not in SERVER_GROUPS["runtime"]
    assert "operations" not in SERVER_GROUPS["runtime"]
    assert _server_group("fedtune.server.tools.report") == "tools"
    init = ROOT / "server" / "runtime" / "__init__.py"
    assert _name(init) == "fedtune.server.runtime"
