"""The decisions of the TensorRT executor that need no GPU: is this engine ours to run here, which profile a step
uses, what is bound where, when a step becomes a CUDA graph, and where the device memory went.

runtime/tensorrt.py only issues the calls these functions decide, so everything here is tested on a CPU host with
the real build record of a real tensorrt_rtx build (tests/test_tensorrt_runtime.py).

Why the load checks are strict: a serialized TensorRT engine runs only with the TensorRT version and on the GPU model
it was built with ("Serialized engines are not portable across platforms or TensorRT versions", TensorRT Developer
Guide, "Serialization" / "Engine compatibility"; TensorRT-RTX compiles for the compute capability chosen at build).
Running it elsewhere fails inside deserialization with a message that names neither side, so the runtime compares the
build record with what is installed first and names both, with the command that rebuilds.
"""
from __future__ import annotations

import math
import shlex
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

from trt_gemma.engine.rules import numpy_dtype  # noqa: F401  (re-exported for the executor)
from trt_gemma.errors import EngineMismatchError, InputError
from trt_gemma.runtime.executor import TensorSpec, View

def rebuild_command(bundle) -> str:
    return f"trt-gemma build --from-bundle {shlex.quote(str(bundle))} --engine tensorrt --force"


def _version_key(version: str, parts: int = 3) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:parts])


def check_build_record(record: Mapping, *, lib: str, version: str, gpu_sm: int, gpu_name: str, bundle) -> None:
    """The engine's build record (BUNDLE/tensorrt/manifest.json) against the installed TensorRT and this GPU: builder,
    version (major.minor.patch) and SM must all match, else an EngineMismatchError naming both sides."""
    built = f"{record.get('builder')} {record.get('builder_version')} for SM {record.get('sm')}"
    here = f"{lib} {version} on {gpu_name} (SM {gpu_sm // 10}.{gpu_sm % 10})"
    fix = f"rebuild the engine on this host: {rebuild_command(bundle)}"
    if record.get("builder") != lib:
        raise EngineMismatchError(f"the engine was built by {built}; this host has {here}", fix=fix)
    if _version_key(record.get("builder_version", "")) != _version_key(version):
        raise EngineMismatchError(f"the engine was built by {built}, and serialized engines run only with the "
                                  f"TensorRT version that built them; this host has {here}", fix=fix)
    sm = str(record.get("sm", ""))
    if sm != f"{gpu_sm // 10}.{gpu_sm % 10}":
        raise EngineMismatchError(f"the engine was built by {built} and runs only on that SM; this host has {here}",
                                  fix=fix)


def io_mismatches(engine_io: Mapping, record_io: Mapping) -> list[str]:
    """Differences between the engine's I/O as deserialized and as the builder recorded it (both in the build
    record's format: {"tensors": [{name, dtype, shape, is_input}], "profiles": {profile: {input: [min, opt, max]}}})."""
    out = []
    got = {t["name"]: t for t in engine_io.get("tensors", [])}
    want = {t["name"]: t for t in record_io.get("tensors", [])}
    for name in sorted(set(got) | set(want)):
        if name not in got or name not in want:
            out.append(f"{name}: {'missing from the engine' if name in want else 'not in the build record'}")
            continue
        for key in ("is_input", "dtype", "shape"):
            g, w = got[name][key], want[name][key]
            if (list(g) if isinstance(g, (list, tuple)) else g) != (list(w) if isinstance(w, (list, tuple)) else w):
                out.append(f"{name}: {key} {g} in the engine, {w} in the build record")
    gp, wp = list(engine_io.get("profiles", {}).values()), list(record_io.get("profiles", {}).values())
    if len(gp) != len(wp):
        out.append(f"{len(gp)} optimization profiles in the engine, {len(wp)} in the build record")
    for i, (g, w) in enumerate(zip(gp, wp)):
        for name in sorted(set(g) | set(w)):
            if [list(s) for s in g.get(name, [])] != [list(s) for s in w.get(name, [])]:
                out.append(f"profile {i} {name}: {g.get(name)} in the engine, {w.get(name)} in the build record")
    return out


def check_io(engine_io: Mapping, record_io: Mapping | None, engine_path, bundle) -> None:
    if record_io is None:
        raise EngineMismatchError(f"{engine_path} has no I/O record in its manifest (built before trt_gemma recorded "
                                  "one), so it cannot be checked against the graph", fix=rebuild_command(bundle))
    diff = io_mismatches(engine_io, record_io)
    if diff:
        raise EngineMismatchError(f"{engine_path} does not match its build record: {'; '.join(diff[:4])}"
                                  + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""),
                                  fix=rebuild_command(bundle))


def select_profile(shapes: Mapping[str, tuple[int, ...]], profiles: list[Mapping[str, list]]) -> int:
    """The optimization profile whose [min, max] ranges hold every input shape; where several do, the one whose opt
    shapes are nearest (TensorRT times its kernels at the opt shape; distance = sum of |log((s+1)/(opt+1))| over
    every dimension, so a one-token step on a short cache goes to decode, not to prefill). An InputError names the
    input whose shape no profile takes."""
    fitting = []
    for index, ranges in enumerate(profiles):
        if all(_within(shapes[name], lo, hi) for name, (lo, _opt, hi) in ranges.items() if name in shapes):
            distance = sum(abs(math.log((s + 1) / (o + 1))) for name, (_lo, opt, _hi) in ranges.items()
                           if name in shapes for s, o in zip(shapes[name], opt))
            fitting.append((distance, index))
    if fitting:
        return min(fitting)[1]
    name, shape = next(((n, s) for n, s in shapes.items() for r in profiles if n in r
                        and not _within(s, r[n][0], r[n][2])), next(iter(shapes.items())))
    spans = ", ".join(f"profile {i}: {list(r[name][0])}..{list(r[name][2])}" for i, r in enumerate(profiles)
                      if name in r)
    raise InputError(f"no optimization profile takes {name} of shape {list(shape)} ({spans})",
                     fix="keep batches and prompt chunks within the recipe's limits, or rebuild with larger ones")


def _within(shape, lo, hi) -> bool:
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def view_address(view: View) -> int:
    """The device address of a view: its buffer's pointer plus the byte offset (a Buffer's handle is the pointer)."""
    return int(view.buffer.handle) + view.offset


@dataclass(frozen=True)
class Binding:
    name: str
    address: int
    shape: tuple[int, ...]
    is_input: bool


def binding_plan(io: tuple[TensorSpec, ...], bindings: Mapping[str, View]) -> tuple[Binding, ...]:
    """Every engine tensor bound to a view of its dtype and rank, as (name, address, shape, is_input) in the engine's
    order; a missing, extra or mistyped binding is an InputError naming it (TensorRT would run with a stale address)."""
    names = {s.name for s in io}
    extra = sorted(set(bindings) - names)
    missing = [s.name for s in io if s.name not in bindings]
    if extra or missing:
        raise InputError(f"bindings do not match the engine: missing {missing}, unknown {extra}",
                         fix="bind every engine input and output, and nothing else")
    out = []
    for spec in io:
        v = bindings[spec.name]
        if v.dtype != spec.dtype or len(v.shape) != len(spec.shape) or any(
                isinstance(d, int) and d >= 0 and d != s for d, s in zip(spec.shape, v.shape)):
            raise InputError(f"{spec.name} is bound as {v.dtype}{list(v.shape)}; the engine has "
                             f"{spec.dtype}{list(spec.shape)}", fix="bind a view of the engine's dtype and shape")
        out.append(Binding(spec.name, view_address(v), tuple(v.shape), spec.is_input))
    return tuple(out)


@dataclass
class GraphCache:
    """When a step becomes a CUDA graph. A graph replays the exact addresses and shapes it was captured with, so its
    key is (profile, every binding's name, shape and address): a step loop that binds the KV pool's prefix for a
    length bucket and fixed step buffers for a batch bucket hits one key per (batch bucket, length bucket). A key is
    captured after `warmup` plain runs (the first runs after a shape change do TensorRT's shape-dependent setup,
    which must not be recorded); at most `capacity` graphs are kept, the least recently used one released first
    (TensorRT-Edge-LLM keeps one decode graph per shape the same way)."""

    warmup: int = 2
    capacity: int = 32
    graphs: OrderedDict = field(default_factory=OrderedDict)  # key -> the executor's graph handle
    seen: dict = field(default_factory=dict)  # key -> plain runs so far

    @staticmethod
    def key(profile: int, plan: tuple[Binding, ...]) -> tuple:
        return (profile,) + tuple((b.name, b.shape, b.address) for b in plan)

    def action(self, key: tuple) -> str:
        """"replay" (a graph exists), "capture" (warm enough: record this run) or "run" (plain execution)."""
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return "replay"
        self.seen[key] = self.seen.get(key, 0) + 1
        return "capture" if self.seen[key] > self.warmup else "run"

    def add(self, key: tuple, graph) -> list:
        """Keep `graph` for `key`; returns the graphs evicted to stay within capacity (the caller destroys them)."""
        self.graphs[key] = graph
        self.seen.pop(key, None)
        evicted = []
        while len(self.graphs) > self.capacity:
            evicted.append(self.graphs.popitem(last=False)[1])
        return evicted

    def clear(self) -> list:
        out, self.graphs, self.seen = list(self.graphs.values()), OrderedDict(), {}
        return out


@dataclass
class MemoryLedger:
    """Device memory by telemetry kind (`memory_bytes{kind=...}`), from the allocations actually made: every
    alloc/free of the executor goes through here, and the engine's weights are measured around deserialization."""

    by_ptr: dict = field(default_factory=dict)  # address -> (kind, bytes)
    fixed: dict = field(default_factory=dict)  # kind -> bytes not owned as buffers (the deserialized engine)

    def add(self, ptr: int, nbytes: int, kind: str) -> None:
        assert ptr not in self.by_ptr, f"address {ptr:#x} allocated twice"
        self.by_ptr[ptr] = (kind, nbytes)

    def remove(self, ptr: int) -> None:
        self.by_ptr.pop(ptr)

    def totals(self) -> dict[str, int]:
        out = dict(self.fixed)
        for kind, nbytes in self.by_ptr.values():
            out[kind] = out.get(kind, 0) + nbytes
        return out
