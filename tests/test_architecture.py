"""The engine's shape: its import graph has no cycle, and it imports no adapter or plugin.

Every import counts: at module level, under ``if TYPE_CHECKING:`` and inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import emitguard

ENGINE = Path(emitguard.__file__).parent


def _module_name(path: Path) -> str:
    relative = path.relative_to(ENGINE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _submodules() -> set[str]:
    return {_module_name(path) for path in ENGINE.rglob("*.py")}


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The engine modules (and outside packages) a file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _submodules()
    graph: dict[str, set[str]] = {}
    for path in ENGINE.rglob("*.py"):
        name = _module_name(path)
        graph[name] = {target for target in _imports(path, modules) if target in modules} - {
            name
        }
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_engine_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert len(graph) > 20  # the walk found the engine
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_imports_no_adapter_and_no_plugin() -> None:
    modules = _submodules()
    for path in ENGINE.rglob("*.py"):
        outside = {name.split(".")[0] for name in _imports(path, modules)}
        assert not outside & {"emitguard_adapters", "pytest_emitguard"}, path.name


def test_the_engine_parts_read_no_private_attribute_of_another_part() -> None:
    """Parts talk through their public methods: no ``x._table``-style reach into another
    part from a module that does not define it (``self._...`` and ``cls._...`` are fine)."""
    parts = {"_table", "_recorder", "_flow", "_pipeline", "_delivery", "_tel", "_senders"}
    offenders = []
    for path in ENGINE.glob("_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in parts
                and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
            ):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert offenders == []
