"""The package's import graph has no cycles, lazy (function-level) imports included.

A cycle that only works because one side imports inside a function (convert <-> hf <-> quant_codecs (now checkpoint/codecs),
reference/checkpoint <-> reference/quantized once did) breaks as soon as someone moves that import to the top, and it
hides which module depends on which. The graph is read with `ast` from the source files, so nothing is imported;
imports under `if TYPE_CHECKING:` are annotations only and are not edges.
"""
from __future__ import annotations

import ast
from pathlib import Path

import trt_gemma

PKG = Path(trt_gemma.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_pkg: bool):
    """Imported trt_gemma modules, skipping TYPE_CHECKING blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set(_imports(ast.parse(path.read_text()), name, path.name == "__init__.py"))
        # an edge to the module itself or to a package's own __init__ chain is not a dependency between stages
        graph[name] = {t for t in targets if t in files and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycles_named_in_issue_10_are_gone():
    g = import_graph()
    assert "trt_gemma.checkpoint.convert" not in _reachable(g, "trt_gemma.checkpoint.hf"), "hf must not import the converter"
    assert "trt_gemma.checkpoint.convert" not in _reachable(g, "trt_gemma.checkpoint.codecs")
    assert "trt_gemma.reference.checkpoint" not in _reachable(g, "trt_gemma.reference.quantized")


def test_no_import_cycles_in_the_package():
    found = cycles(import_graph())
    assert not found, f"import cycles (lazy imports included): {found}"


def test_graph_reader_sees_lazy_imports():
    """The reader must see function-level imports, or the tests above could not fail."""
    tree = ast.parse("def f():\n    from trt_gemma.checkpoint.convert import cast\n")
    assert "trt_gemma.checkpoint.convert" in set(_imports(tree, "trt_gemma.x", False))
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen
