"""latentgen's modules import each other without cycles, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "latentgen"

# Imports known to close a cycle and on their way out, each with who removes it. Keep it empty.
KNOWN: set[tuple[str, str]] = set()


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the latentgen modules it imports anywhere in its body.

    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``
    (its ``__init__``); importing ``a.b`` does not count as importing ``a``'s ``__init__``.
    """
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        graph[name].add(sub)
                    elif target in modules:
                        graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        found.append(frozenset(component))
    return found


def test_finder_sees_a_cycle_and_lazy_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []
    real = import_graph()
    # Top-level imports are edges, and so are imports inside functions (lazy imports).
    assert "latentgen.plugins" in real["latentgen.registry"]
    assert "latentgen.registry" in real["latentgen.specs"]
    assert "latentgen.registry" in real["latentgen.tokenizers.vqvae"]  # imported in a method


def test_no_import_cycles():
    graph = import_graph()
    for module, target in KNOWN:
        graph[module].discard(target)
    found = [sorted(c) for c in cycles(graph)]
    assert not found, f"import cycles: {found}"


def test_plugin_layer_is_layered():
    graph = import_graph()
    low_to_high = [
        "latentgen.components",
        "latentgen.plugins",
        "latentgen.registry",
        "latentgen.specs",
    ]
    for i, module in enumerate(low_to_high):
        above = set(low_to_high[i + 1 :])
        assert not graph[module] & above, f"{module} imports {graph[module] & above}"
