"""The package's layout: the import graph among ``rzenembed`` modules, built from the source
with ``ast`` (imports inside functions included, since a lazy import is still a dependency
that only hides a cycle), has no cycle through the pairs that were untangled."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "rzenembed"

# Pairs that must not sit on a common cycle; a name covers the module and, for a package,
# everything under it.
UNTANGLED = [
    ("rzenembed.data.formats", "rzenembed.data.importers"),
    ("rzenembed.data.inspect", "rzenembed.prep.ingest"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def known_module(name: str, modules: Iterable[str]) -> str | None:
    """The longest prefix of a dotted name that is one of ``modules`` (an imported function
    or class belongs to the module that defines it)."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an ``import`` or ``from ... import`` anywhere in the module names
    (relative imports resolved); ``from a import b`` gives ``a.b``, which resolves to
    module ``a.b`` when there is one and to ``a`` otherwise."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {
            known_module(imported, modules)
            for imported in imported_names(tree, name, path.name == "__init__.py")
        }
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds at least one
    cycle), sorted; Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def covers(name: str, module: str) -> bool:
    return module == name or module.startswith(name + ".")


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    """Does some module under ``start`` import, directly or not, some module under ``goal``?"""
    seen = {m for m in graph if covers(start, m)}
    todo = list(seen)
    while todo:
        for target in graph[todo.pop()]:
            if covers(goal, target):
                return True
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return False


def test_the_graph_sees_lazy_and_relative_imports():
    tree = ast.parse(
        "from . import b\nfrom .c import d\ndef f():\n    import rzenembed.x.y\n"
        "    from rzenembed.z import w\n"
    )
    names = imported_names(tree, "rzenembed.pkg.a", is_package=False)
    assert {"rzenembed.pkg.b", "rzenembed.pkg.c.d", "rzenembed.x.y", "rzenembed.z.w"} <= names
    modules = ["rzenembed.pkg.b", "rzenembed.pkg.c", "rzenembed.z"]
    assert known_module("rzenembed.pkg.c.d", modules) == "rzenembed.pkg.c"
    assert known_module("rzenembed.z.w", modules) == "rzenembed.z"
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_through_the_untangled_pairs():
    graph = import_graph()
    assert "rzenembed.prep.ingest" in graph and "rzenembed.data.formats.mmeb" in graph
    for cycle in cycles(graph):
        print("import cycle:", " <-> ".join(cycle))
    tangled = [(a, b) for a, b in UNTANGLED if reaches(graph, a, b) and reaches(graph, b, a)]
    assert tangled == []
