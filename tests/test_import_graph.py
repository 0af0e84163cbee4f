"""The package's import graph has no cycles and points one way, lazy (function-level) imports included.

`LAYERS` gives every unit (a stage package such as trt_gemma.checkpoint, or a top-level module such as trt_gemma.plan)
its layer: a module may import units of its own layer or lower, never higher. Each package's `__init__.py` docstring
says the same in its "May import:" line. `get_target` (a target looked up by name) is called only at a command's
boundary; everything below takes the `Target` object.

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


# unit -> layer, lowest first. Same layer: allowed (the cycle test still applies).
LAYERS = {
    # base: no stage knowledge
    "trt_gemma.errors": 0, "trt_gemma.console": 0, "trt_gemma.fsutil": 0, "trt_gemma.safe_io": 0,
    "trt_gemma.gpu_probe": 0, "trt_gemma.assets": 0, "trt_gemma.build_configs": 0,
    # hardware: the target table, what this host is, what it measures
    "trt_gemma.targets": 1, "trt_gemma.detect": 1, "trt_gemma.telemetry": 1,
    # the pipeline's stages
    "trt_gemma.checkpoint": 2,
    "trt_gemma.quant": 3,
    "trt_gemma.reference": 4,
    "trt_gemma.onnx": 5,
    "trt_gemma.engine": 6, "trt_gemma.runtime": 6,
    # the recipe (validated with the engine's builder rules), then the planner that reads it
    "trt_gemma.recipes": 7,
    "trt_gemma.plan": 8,
    # what works on artifacts: manifests, eval, the guard's classifier, SAE features
    "trt_gemma.manifest": 9, "trt_gemma.eval": 9, "trt_gemma.safety": 9, "trt_gemma.scope": 9,
    # the bundle (plan -> quantize/convert -> quality -> manifest -> engine)
    "trt_gemma.build": 10, "trt_gemma.check": 10,
    # the public entry points
    "trt_gemma.stages": 11, "trt_gemma.api": 11,
    "trt_gemma.serve": 12, "trt_gemma.deploy": 12,
    "trt_gemma.commands": 13, "trt_gemma.cli": 13, "trt_gemma.__main__": 13, "trt_gemma": 13,
}


def unit(module: str) -> str:
    """trt_gemma.engine.plan -> trt_gemma.engine; trt_gemma.plan -> trt_gemma.plan; trt_gemma -> trt_gemma."""
    return ".".join(module.split(".")[:2])


def _units() -> set[str]:
    return {unit(_module_name(p)) for p in PKG.rglob("*.py")}


def test_the_layer_table_covers_every_unit():
    units = _units()
    assert not units - set(LAYERS), f"units missing from LAYERS (give each a layer): {sorted(units - set(LAYERS))}"
    assert not set(LAYERS) - units, f"LAYERS names units that do not exist: {sorted(set(LAYERS) - units)}"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {LAYERS[unit(m)]}) imports {t} (layer {LAYERS[unit(t)]})"
                  for m, targets in graph.items() for t in targets if LAYERS[unit(t)] > LAYERS[unit(m)])


def test_lower_layers_never_import_higher_ones():
    found = layer_violations(import_graph())
    assert not found, "imports against the layer order (lazy ones included):\n" + "\n".join(found)


def test_layer_check_can_fail():
    assert layer_violations({"trt_gemma.quant.modelopt": {"trt_gemma.plan"}}) == [
        "trt_gemma.quant.modelopt (layer 3) imports trt_gemma.plan (layer 8)"]


def _short(u: str) -> str:
    return u.removeprefix("trt_gemma.")


def test_package_docstrings_may_import_only_lower_layers():
    """Each package's "May import:" line names only units its layer allows (read off the table, not re-typed)."""
    names = {_short(u): u for u in LAYERS if u != "trt_gemma"}
    for init in sorted(PKG.glob("*/__init__.py")):
        pkg = _module_name(init)
        if pkg in ("trt_gemma.build_configs", "trt_gemma.commands"):  # data only / the top layer
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        line = next((ln for ln in doc.replace("\n", " ").split(". ") if "May import:" in ln), None)
        assert line is not None, f"{init}: docstring has no 'May import:' line"
        named = [names[w] for w in _words(line.split("May import:", 1)[1]) if w in names]
        assert named, f"{init}: 'May import:' names no unit: {line!r}"
        above = [n for n in named if LAYERS[n] > LAYERS[pkg]]
        assert not above, f"{init}: 'May import:' allows higher layers {above}: {line!r}"


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z_]+", text)


# Where a target may be looked up by name: its table, the resolver, and the command boundary.
GET_TARGET_ALLOWED = ("trt_gemma.targets", "trt_gemma.detect", "trt_gemma.stages", "trt_gemma.api", "trt_gemma.cli",
                      "trt_gemma.commands")


def get_target_callers() -> dict[str, list[int]]:
    out = {}
    for path in PKG.rglob("*.py"):
        lines = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if _names_get_target(n)]
        if lines:
            out[_module_name(path)] = lines
    return out


def _names_get_target(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        f = node.func
        return (isinstance(f, ast.Name) and f.id == "get_target") or (
            isinstance(f, ast.Attribute) and f.attr == "get_target")
    if isinstance(node, ast.ImportFrom):
        return any(a.name == "get_target" for a in node.names)
    return False


def test_get_target_only_at_the_command_boundary():
    """Resolve once, pass the object: below commands/, stages, api and detect.resolve_target every function takes a
    Target (plan's memory and support checks, the engine plan and rules, build's caveats, the TensorRT-LLM flags)."""
    below = {m: lines for m, lines in get_target_callers().items()
             if not any(m == a or m.startswith(a + ".") for a in GET_TARGET_ALLOWED)}
    assert not below, f"get_target below the command boundary (module: lines): {below}"


def test_get_target_check_can_fail():
    tree = ast.parse("from trt_gemma import targets\ndef f(n):\n    return targets.get_target(n)\n")
    assert sum(map(_names_get_target, ast.walk(tree))) == 1
