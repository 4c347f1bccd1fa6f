"""The package's import graph has no cycles, and the command line parses without importing torch.

Every `import` and `from ... import` of a cogvlm module counts, at module level or inside a function: a lazy import
from a low module up into a higher one is still a loop in the design, even if Python tolerates it at run time.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cogvlm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, here: str, is_package: bool, modules: set[str]) -> set[str]:
    """cogvlm modules imported anywhere in the source of module `here` (relative imports resolved; `from x import
    y` counts y when y is itself a module)."""
    package = here if is_package else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m != here}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    # `cogvlm/__init__` imports lazily by name strings (importlib), which the AST does not see: it has no edges.
    return {module_name(f): imported_modules(f.read_text(), module_name(f), f.name == "__init__.py", modules)
            for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own submodules (re-exports)
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports():
    modules = {"cogvlm", "cogvlm.low", "cogvlm.high", "cogvlm.pkg", "cogvlm.pkg.part", "cogvlm.other"}
    source = "import os\n\ndef f():\n    from .high import g\n    from . import other\n    from .pkg import part\n"
    assert imported_modules(source, "cogvlm.low", False, modules) == {"cogvlm", "cogvlm.high", "cogvlm.other",
                                                                       "cogvlm.pkg", "cogvlm.pkg.part"}
    assert imported_modules("from ..low import x\n", "cogvlm.pkg.part", False, modules) == {"cogvlm.low"}
    assert imported_modules("from .part import y\n", "cogvlm.pkg", True, modules) == {"cogvlm.pkg.part"}


def test_no_import_cycles_in_cogvlm():
    graph = import_graph()
    assert "cogvlm.model" in graph and "cogvlm.generate" in graph
    assert "cogvlm.model" in graph["cogvlm.generate"]  # the parser does see edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_core_imports_nothing_above_it():
    core = {"cogvlm.config", "cogvlm.vit", "cogvlm.adapter", "cogvlm.visual_expert", "cogvlm.llm", "cogvlm.model",
            "cogvlm.layout", "cogvlm.fusion"}
    graph = import_graph()
    for name in core:
        assert graph[name] <= core, f"{name} imports {sorted(graph[name] - core)}"
