"""The house's floors (../shared/DESIGN.md), read from the code's imports: common/
imports no client/ or server/ code; client/ and server/ never import each other;
only the top floor (simulations/: the CLI's dispatch and the simulation driver)
knows both; and no fedtune module imports itself round a cycle. Lazy imports inside
functions count too."""

from __future__ import annotations

import ast
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


def _imports(path: Path) -> set[str]:
    """The fedtune modules a file imports (``fedtune.server.strategy``, ...)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fedtune.")}
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("fedtune.") and node.level == 0:
            for alias in node.names:  # `from fedtune.server import checkpoint`
                sub = f"{node.module}.{alias.name}"
                out.add(sub if (ROOT / sub.split(".", 1)[1].replace(".", "/")
                                ).with_suffix(".py").is_file() else node.module)
    return out


def _graph() -> dict[str, set[str]]:
    return {f"fedtune.{p}.{f.stem}": _imports(f)
            for p in PACKAGES for f in sorted((ROOT / p).glob("*.py"))}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_floor_imports_only_downwards(package: str) -> None:
    wrong = sorted(f"{mod} -> {dep}" for mod, deps in _graph().items()
                   if mod.split(".")[1] == package for dep in deps
                   if dep.split(".")[1] not in ALLOWED[package])
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


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
    bad.write_text("def f():\n    from fedtune.client.trainer import train_local\n")
    assert _imports(bad) == {"fedtune.client.trainer"}
    assert "client" not in ALLOWED["server"] and "server" not in ALLOWED["client"]
