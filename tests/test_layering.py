"""The package's layers point down: no import cycles between diyllm's modules, and the low layers never
reach up (diyllm.model imports nothing from diyllm.training; diyllm.data nothing from training or
generation). Every import counts, also the ones inside functions: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diyllm"
# (importing package, packages it must never reach, directly or through other modules)
FORBIDDEN = [("diyllm.model", ("diyllm.training",)),
             ("diyllm.data", ("diyllm.training", "diyllm.generation"))]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the diyllm modules it imports (`from diyllm.x import y` counts y when y is a module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (a package's __init__ importing its own
    submodules is not a cycle unless a submodule imports the package back)."""
    found, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        group = {m for m in reachable(graph, start) if start in reachable(graph, m)}
        done |= group
        if group:
            found.append(sorted(group))
    return found


def test_no_import_cycles():
    graph = import_graph()
    # A package __init__ that re-exports its submodules is imported by them only through `from pkg import`,
    # which would look like a cycle: drop edges from a submodule to its own package's __init__.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    assert cycles(graph) == []


def test_low_layers_never_import_high_ones():
    graph = import_graph()
    for low, highs in FORBIDDEN:
        for name in (m for m in graph if m == low or m.startswith(low + ".")):
            bad = sorted(d for d in reachable(graph, name) if d.startswith(highs))
            assert not bad, f"{name} reaches {bad}"
