"""The TensorRT executor calls only what the installed bindings have, with the arity they have.

TensorRT runtimes cannot run here (no GPU), but the tensorrt_rtx and cuda-python bindings import, and both describe
every function in `__doc__` (pybind11 and Cython write `name(self: Cls, a: T, b: T = default) -> R`, one line per
overload). runtime/tensorrt.py lists each TensorRT member it touches in TRT_API; this test checks the list against
tensorrt_rtx and checks, by reading the module's source, that nothing outside the list is used. The cuda-python calls in
runtime/cuda_memory.py are checked the same way against `cuda.bindings.runtime`. TensorRT 10.x (Jetson, data center)
has the same members on the same classes (TensorRT Python API "Core" pages, cited in runtime/tensorrt.py); the two
that older TensorRT lacks are probed by `features()` rather than assumed.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from trt_gemma.runtime import cuda_memory, tensorrt as T

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_CUDA = cuda_memory.installed()
SOURCE = {m: Path(m.__file__).read_text() for m in (T, cuda_memory)}


def arities(fn) -> set[int]:
    """The parameter counts (self excluded) each overload in a pybind11/Cython docstring accepts."""
    out = set()
    name = fn.__name__
    for line in (fn.__doc__ or "").splitlines():
        m = re.match(rf"\s*(?:\d+\.\s*)?{re.escape(name)}\((.*)\)(?:\s*->.*)?$", line)
        if not m or m.group(1) == "*args, **kwargs":
            continue
        params = [p for p in _split(m.group(1)) if p and not p.startswith("self")]
        required = sum("=" not in p for p in params)
        out.update(range(required, len(params) + 1))
    return out


def _split(params: str) -> list[str]:
    """Top-level comma split (types such as dict[str, int] contain commas)."""
    out, depth, cur = [], 0, ""
    for ch in params:
        depth += ch in "[(<"
        depth -= ch in "])>"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def attributes_used(source: str) -> set[str]:
    """Attribute names read in `source` through anything but `self` directly (self.x is our own state)."""
    return {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)
            and not (isinstance(n.value, ast.Name) and n.value.id == "self")}


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
@pytest.mark.parametrize("cls,member,arity", T.TRT_API, ids=[f"{c}.{m}" for c, m, _ in T.TRT_API])
def test_every_tensorrt_member_exists_with_its_arity(cls, member, arity):
    import tensorrt_rtx as trt

    owner = getattr(trt, cls, None)
    assert owner is not None, f"tensorrt_rtx has no {cls}"
    attr = owner.__dict__.get(member, getattr(owner, member, None))
    assert attr is not None, f"tensorrt_rtx.{cls} has no {member}"
    if arity is None:
        assert isinstance(attr, property) or isinstance(attr, owner), \
            f"{cls}.{member} is a {type(attr).__name__}, not a property or enum value"
    else:
        got = arities(getattr(owner, member))
        assert arity in got, f"{cls}.{member} takes {sorted(got)} arguments in tensorrt_rtx, the executor passes {arity}"


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
def test_the_executor_uses_no_tensorrt_member_outside_its_list():
    import tensorrt_rtx as trt

    classes = {c for c, _, _ in T.TRT_API} | {"ILogger"}
    members = {m for c in classes for m in dir(getattr(trt, c)) if not m.startswith("_")}
    listed = {m for _, m, _ in T.TRT_API}
    ours = {"errors", "name", "value"}  # our logger's list; enum members' own attributes
    unlisted = (attributes_used(SOURCE[T]) & members) - listed - ours - {"log", "ERROR", "INTERNAL_ERROR"}
    assert not unlisted, f"runtime/tensorrt.py uses TensorRT members missing from TRT_API: {sorted(unlisted)}"


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
def test_features_of_tensorrt_rtx():
    """TensorRT-RTX has every optional path: user-managed context memory, its own CUDA graphs, the runtime cache."""
    import tensorrt_rtx as trt

    assert T.features(trt) == {"user_managed": True, "runtime_config": True, "builtin_graphs": True,
                               "runtime_cache": True}


@pytest.mark.skipif(not HAS_CUDA, reason="cuda-python is not installed (pip install cuda-python)")
def test_every_cuda_runtime_call_exists_with_its_arity():
    rt = cuda_memory.cudart()
    calls = {}  # name -> number of positional arguments, read from the call sites in cuda_memory.py
    for node in ast.walk(ast.parse(SOURCE[cuda_memory])):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("cuda") \
                and isinstance(node.func.value, (ast.Attribute, ast.Name)):
            calls[node.func.attr] = len(node.args)
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaMemcpy2DAsync", "cudaStreamSynchronize",
            "cudaStreamBeginCapture", "cudaGraphLaunch"} <= set(calls), sorted(calls)
    for name, n in sorted(calls.items()):
        fn = getattr(rt, name, None)
        assert fn is not None, f"cuda.bindings.runtime has no {name}"
        assert n in arities(fn), f"{name} takes {sorted(arities(fn))} arguments, cuda_memory.py passes {n}"
    for enum, member in (("cudaMemcpyKind", "cudaMemcpyHostToDevice"), ("cudaMemcpyKind", "cudaMemcpyDeviceToHost"),
                         ("cudaMemcpyKind", "cudaMemcpyDeviceToDevice"),
                         ("cudaStreamCaptureMode", "cudaStreamCaptureModeThreadLocal")):
        assert hasattr(getattr(rt, enum), member), f"{enum}.{member}"
    assert isinstance(rt.cudaStreamNonBlocking, int)
