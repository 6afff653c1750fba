"""The architecture as a test: imports go one way (core <- models <- editors/evaluation <- api <- commands), the
library never imports the CLI, and no package has an import circle. Every import counts, deferred ones inside functions
too: a circle that only works because one side imports late is still a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "prunecli"

# Lower layers may not import higher ones. Top-level helper modules (errors, jsonio, progress, requests,
# distributed, plotting) are layer 0/1 as listed; api/ (each command as a function) sits on the library, cli.py and
# commands/ are the top.
LAYER = {"errors": 0, "jsonio": 0, "progress": 0, "requests": 1, "distributed": 1, "core": 1, "plotting": 1,
         "models": 2, "editors": 3, "evaluation": 3, "api": 4, "commands": 5, "cli": 5, "__main__": 6, "__init__": 0}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The prunecli modules `name` imports (anywhere in the file), resolved to known module names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("prunecli") and t not in ("prunecli", name):
                found.add(t)
    return found


GRAPH = {n: _imports(n, p, set(_modules())) for n, p in _modules().items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER[parts[1]] if len(parts) > 1 else 0


def test_imports_go_down_the_layers() -> None:
    upward = [f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps
              if _layer(b) > _layer(a) and not (a.endswith("__main__") or a == "prunecli.cli")]
    assert not upward, upward


def test_editors_and_evaluation_are_siblings() -> None:
    """Both sit on models/ (scoring, tokenisation, forward-pass plumbing); neither imports the other."""
    crossing = [f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps
                for x, y in (("editors", "evaluation"), ("evaluation", "editors"))
                if a.startswith(f"prunecli.{x}") and b.startswith(f"prunecli.{y}")]
    assert not crossing, crossing


def test_the_library_never_imports_the_cli() -> None:
    bad = [f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps
           if (b.startswith("prunecli.commands") or b == "prunecli.cli")
           and not (a.startswith("prunecli.commands") or a in ("prunecli.cli", "prunecli.__main__"))]
    assert not bad, bad


@pytest.mark.parametrize("package", ["prunecli.core", "prunecli.models", "prunecli.editors", "prunecli.evaluation",
                                     "prunecli.api", "prunecli.commands", "prunecli"])
def test_no_import_circles(package: str) -> None:
    inside = {n for n in GRAPH if n == package or n.startswith(package + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node] & inside):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for n in sorted(inside):
        if n not in state:
            visit(n, [n])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_the_graph_is_real() -> None:
    """The walker sees known edges (a test that found no imports would pass everything)."""
    assert "prunecli.core.checkpoint" in GRAPH["prunecli.core.delta"]
    assert "prunecli.editors.base" in GRAPH["prunecli.editors.rome"]
