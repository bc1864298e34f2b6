"""The package layering, read from the source: `shared/` imports nothing from `bridge/` or
`workers/`, no import cycle among the project's modules, and no product module over the size
a reader can hold (400 lines; `shared/protocol.py`, the one wire catalogue, is exempt).

Only imports a module makes when it loads count for cycles; imports inside functions are
how the CLI keeps subcommands lazy, and run after every module has loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "bridge", "workers")
MAX_LINES = 400
EXEMPT = {"shared/protocol.py"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, *, load_time_only: bool) -> set[str]:
    """Project modules `module` imports (optionally only at load time, outside functions and TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if load_time_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if load_time_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, path.name == "__init__.py", child)
                found.add(target)
                found.update(f"{target}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_shared_imports_nothing_from_bridge_or_workers() -> None:
    offenders = {name: sorted(m for m in _imports(name, path, load_time_only=False) if not m.startswith("shared"))
                 for name, path in _sources().items() if name.startswith("shared")}
    assert not {k: v for k, v in offenders.items() if v}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := walk(name)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    sources = _sources()
    graph = {name: {m for m in _imports(name, path, load_time_only=True) if m in sources and m != name}
             for name, path in sources.items()}
    # A package's __init__ importing its own submodules is how packages are built, not a cycle:
    # Python loads the package first, then the submodule.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder(tmp_path: Path) -> None:
    """The checks above are not vacuous: a cycle is found, and only load-time imports count."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    a = tmp_path / "a.py"
    a.write_text("from shared import routing\nimport shared.cancel\n\ndef f():\n    import bridge.core\n")
    assert _imports("shared.x", a, load_time_only=True) == {"shared", "shared.routing", "shared.cancel"}
    assert "bridge.core" in _imports("shared.x", a, load_time_only=False)


def test_no_product_module_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(ROOT)) not in EXEMPT}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
