"""Imports run one way: no cycle between package modules, and the pipeline knows none of its users.

Read from the syntax tree (every import statement, including ones inside functions, since a lazy
import is still a dependency), so the test sees exactly what the source says without importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "latentdiff"
# What the pipeline must never reach, directly or through another module: it is what they build on.
PIPELINE_MUST_NOT_IMPORT = ("edit", "serve", "evaluate", "train", "distill")


def module_name(path: Path) -> str:
    """latentdiff/serve/app.py -> latentdiff.serve.app; a package's __init__.py -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``path`` (module ``name``) imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from . import edit` imports the submodule edit; `from .config import X` the module config.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring visited nodes)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_graph_sees_known_edges():
    # Guards the resolver itself: a graph with no edges would pass every other test here.
    graph = import_graph()
    assert "latentdiff.pipeline" in graph["latentdiff.edit"]
    assert "latentdiff.vae" in graph["latentdiff.pipeline"]
    assert "latentdiff.edit" in graph["latentdiff.serve.app"]
    assert "latentdiff.evaluate.classifier" in graph["latentdiff.evaluate.score"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("user", PIPELINE_MUST_NOT_IMPORT)
def test_pipeline_does_not_import_its_users(user):
    reached = reachable(import_graph(), "latentdiff.pipeline")
    bad = sorted(m for m in reached if m == f"latentdiff.{user}" or m.startswith(f"latentdiff.{user}."))
    assert not bad, f"latentdiff.pipeline imports {bad} (directly or through another module); they build on it"


def test_latents_does_not_import_training():
    assert "latentdiff.train" not in reachable(import_graph(), "latentdiff.latents")


def test_start_up_does_not_import_torchvision():
    """torchvision's import pulls in torch._dynamo (~5 s on a 2-core CPU): the package and its scripts' start-up
    must not pay it. Only the MNIST download (data.py) imports it, lazily, when it runs."""
    import subprocess
    import sys

    code = ("import sys, latentdiff, latentdiff.train, latentdiff.distill, latentdiff.edit, latentdiff.evaluate; "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
