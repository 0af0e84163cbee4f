"""`TensorRTExecutor`: the `Executor` (runtime/executor.py) over a serialized TensorRT or TensorRT-RTX engine.

One class for both libraries: they share the runtime API this uses (`Runtime.deserialize_cuda_engine`,
`ICudaEngine.create_execution_context`, `IExecutionContext.set_optimization_profile_async` / `set_input_shape` /
`set_tensor_address` / `execute_async_v3`; TensorRT Python API, "Core" pages Runtime, ICudaEngine, IExecutionContext:
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html). Where they
differ it is a feature present or absent on the module, probed once (`features`), never a version string:
- context memory user-managed: `ExecutionContextAllocationStrategy.USER_MANAGED` + `set_device_memory(ptr, size)`
  (TensorRT >= 10.1 and TensorRT-RTX; older TensorRT sets the `device_memory` property; polygraphy 0.53
  `backend/trt/runner.py` makes the same choice);
- CUDA graphs: TensorRT-RTX captures whole graphs itself (`IRuntimeConfig.cuda_graph_strategy =
  WHOLE_GRAPH_CAPTURE`) and keeps its JIT kernels in a runtime cache, saved in the bundle
  (NVIDIA/TensorRT-RTX demo/utils/engine.py@504c46f6 `activate`/`deactivate`); with TensorRT we capture a step on
  our stream (cudaStreamBeginCapture / EndCapture / GraphInstantiate / GraphLaunch) once `GraphCache` says it is warm.

Nothing TensorRT is imported before `unavailable_reason` has found the module, cuda-python and a GPU (NVML on a dGPU,
the device tree on a Jetson): TensorRT runtimes segfault rather than raise without one. The decisions (is this engine
ours to run, which profile, what is bound where, when to capture, where memory went) are runtime/engine_plan.py's.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Mapping

import numpy as np

from trt_gemma.engine.build import collecting_logger
from trt_gemma.engine.rules import BUILDERS
from trt_gemma.errors import DependencyError, DeviceError, InputError
from trt_gemma.safe_io import check_tree, read_json_object
from trt_gemma.runtime.engine_plan import (GraphCache, MemoryLedger, binding_plan, check_build_record, check_io,
                                           numpy_dtype, view_address)
from trt_gemma.runtime.executor import Buffer, TensorSpec, View
from trt_gemma.runtime import cuda_memory

ENGINE_FILE = "model.engine"  # engine/build.py writes BUNDLE/tensorrt/{model.engine, manifest.json}
RUNTIME_CACHE = "tensorrt_rtx.runtime.cache"  # TensorRT-RTX JIT kernels, beside the engine

# Every TensorRT class member this module touches: (class, member, parameters without self; None = property).
# tests/test_tensorrt_contract.py checks each against the installed tensorrt_rtx bindings' own signatures and that
# this module uses no other member. TensorRT 10.x documents the same members at
# https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ + Runtime.html (Runtime),
# Engine.html (ICudaEngine, ExecutionContextAllocationStrategy), ExecutionContext.html (IExecutionContext:
# set_device_memory from 10.1); IRuntimeConfig is in later 10.x (the 10.14 C++ API has it with the allocation
# strategy only; 10.3 has none) and in TensorRT-RTX, whose IRuntimeCache and CudaGraphStrategy TensorRT lacks
# (docs.nvidia.com/deeplearning/tensorrt-rtx, "IRuntimeConfig"): each is used only where `features` finds it.
TRT_API: tuple[tuple[str, str, int | None], ...] = (
    ("Runtime", "deserialize_cuda_engine", 1),
    ("ICudaEngine", "num_io_tensors", None),
    ("ICudaEngine", "num_optimization_profiles", None),
    ("ICudaEngine", "get_tensor_name", 1),
    ("ICudaEngine", "get_tensor_mode", 1),
    ("ICudaEngine", "get_tensor_dtype", 1),
    ("ICudaEngine", "get_tensor_shape", 1),
    ("ICudaEngine", "get_tensor_profile_shape", 2),
    ("ICudaEngine", "device_memory_size_v2", None),
    ("ICudaEngine", "get_device_memory_size_for_profile_v2", 1),
    ("ICudaEngine", "create_execution_context", 1),
    ("ICudaEngine", "create_runtime_config", 0),
    ("IRuntimeConfig", "set_execution_context_allocation_strategy", 1),
    ("IRuntimeConfig", "cuda_graph_strategy", None),
    ("IRuntimeConfig", "create_runtime_cache", 0),
    ("IRuntimeConfig", "set_runtime_cache", 1),
    ("IRuntimeCache", "serialize", 0),
    ("IRuntimeCache", "deserialize", 1),
    ("IExecutionContext", "set_device_memory", 2),
    ("IExecutionContext", "set_optimization_profile_async", 2),
    ("IExecutionContext", "set_input_shape", 2),
    ("IExecutionContext", "set_tensor_address", 2),
    ("IExecutionContext", "execute_async_v3", 1),
    ("ExecutionContextAllocationStrategy", "USER_MANAGED", None),
    ("CudaGraphStrategy", "WHOLE_GRAPH_CAPTURE", None),
    ("TensorIOMode", "INPUT", None),
)


def unavailable_reason(lib: str | None = None) -> str | None:
    """Why this host cannot run a `lib` engine ("tensorrt" / "tensorrt_rtx"; None: either), or None when it can.
    Imports nothing heavy: find_spec for the modules, NVML / the device tree for the GPU."""
    libs = [lib] if lib else list(BUILDERS)
    have = [n for n in libs if importlib.util.find_spec(n) is not None]
    if not have:
        return " or ".join(f"{n} is not installed ({BUILDERS[n].install})" for n in libs)
    if not cuda_memory.installed():
        return f"cuda-python is not installed ({cuda_memory.CUDA_PYTHON_INSTALL})"
    from trt_gemma.detect import detect

    host = detect()
    if host.kind == "none":
        return f"no NVIDIA GPU on this host ({host.why or 'NVML and the device tree found none'})"
    return None


def read_record(bundle: Path) -> dict:
    """BUNDLE/tensorrt/manifest.json: the engine's build record (builder, version, SM, I/O as the builder saw it)."""
    check_tree(bundle)  # the one way in for a bundle: no link out, loop or dangling link anywhere in it
    path = Path(bundle) / "tensorrt" / "manifest.json"
    if not path.is_file():
        raise InputError(f"{Path(bundle)} has no TensorRT engine ({path} is missing)",
                         fix=f"build it on the device: trt-gemma build --from-bundle {bundle} --engine tensorrt")
    return read_json_object(path)


def features(trt) -> dict[str, bool]:
    """What this TensorRT module offers, probed on the module (see the module docstring)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    return {"user_managed": strategy is not None and hasattr(strategy, "USER_MANAGED")
            and hasattr(trt.IExecutionContext, "set_device_memory"),
            "runtime_config": hasattr(trt.ICudaEngine, "create_runtime_config"),
            "builtin_graphs": hasattr(trt, "CudaGraphStrategy"),
            "runtime_cache": hasattr(trt, "IRuntimeCache")}


class TensorRTExecutor:
    """Runs one engine on one CUDA stream. Memory: `alloc(nbytes, kind)` tags each buffer ("kv_cache" for the pool,
    "activations" for step buffers) so `memory_bytes()` reports the real allocations; the context's scratch memory
    (the largest profile's) is allocated once here; the engine's weights are measured around deserialization."""

    def __init__(self, bundle: str | Path, *, device: int = 0, cuda_graphs: bool = True):
        self.bundle = Path(bundle)
        self.record = record = read_record(self.bundle)  # kept: the backends size their pool by it
        self.lib = record.get("builder", "tensorrt")
        why = unavailable_reason(self.lib)
        if why:
            raise DependencyError(f"cannot run {self.bundle / 'tensorrt' / ENGINE_FILE} here: {why}",
                                  fix="run it on the device the engine was built for")
        self.trt = trt = importlib.import_module(self.lib)
        self.features = features(trt)
        self.stream = cuda_memory.CudaStream(device)
        self.ledger = MemoryLedger()
        try:
            self._load(record, cuda_graphs)
        except BaseException:  # a refused or failed load leaves no device memory or stream behind
            self.context = self.engine = None  # TensorRT objects go before the memory they use
            for ptr in list(self.ledger.by_ptr):
                self.stream.free(ptr)
            self.stream.close()
            raise
        self._profile: int | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _load(self, record: dict, cuda_graphs: bool) -> None:
        trt = self.trt
        sm, gpu = self.stream.sm()
        check_build_record(record, lib=self.lib, version=trt.__version__, gpu_sm=sm, gpu_name=gpu, bundle=self.bundle)
        self.engine = self._deserialize(self.bundle / "tensorrt" / ENGINE_FILE)
        found = engine_io(self.engine, trt)
        check_io(found, record.get("io"), self.bundle / "tensorrt" / ENGINE_FILE, self.bundle)
        self.io = TensorSpec.of_records(found["tensors"])
        self.num_profiles = self.engine.num_optimization_profiles
        self.graphs = GraphCache() if cuda_graphs and not self.features["builtin_graphs"] else None
        self._runtime_cache = None
        self.context = self._context(cuda_graphs)

    # --- load (GPU only) -------------------------------------------------------------------------------------------

    def _deserialize(self, path: Path):
        blob = path.read_bytes()
        free0, _ = self.stream.mem_info()
        self._log = collecting_logger(self.trt)  # kept: TensorRT holds the logger by reference for the runtime's life
        self.runtime = self.trt.Runtime(self._log)
        engine = self.runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise DeviceError(f"Runtime.deserialize_cuda_engine({path}) failed: {_first(self._log.errors)}",
                              fix="rebuild the engine on this host (the build record matched, so the file may be "
                                  "damaged)")
        self.ledger.fixed["engine"] = max(0, free0 - self.stream.mem_info()[0])
        return engine

    def _context(self, cuda_graphs: bool):
        trt, f = self.trt, self.features
        if f["runtime_config"]:
            config = self.engine.create_runtime_config()
            if f["user_managed"]:
                config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if f["builtin_graphs"] and cuda_graphs:
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            if f["runtime_cache"]:
                self._runtime_cache = config.create_runtime_cache()
                cache_file = self.bundle / "tensorrt" / RUNTIME_CACHE
                if cache_file.is_file():
                    self._runtime_cache.deserialize(cache_file.read_bytes())
                config.set_runtime_cache(self._runtime_cache)
            context = self.engine.create_execution_context(config)
        elif f["user_managed"]:
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:
            context = self.engine.create_execution_context()
        if context is None:
            raise DeviceError("ICudaEngine.create_execution_context failed", fix="check free device memory")
        if f["user_managed"]:
            size = max([self.engine.device_memory_size_v2] + [
                self.engine.get_device_memory_size_for_profile_v2(p) for p in range(self.num_profiles)])
            self._scratch = self.alloc(size, kind="activations")
            context.set_device_memory(int(self._scratch.handle), size)
        return context

    # --- Executor ----------------------------------------------------------------------------------------------------

    def alloc(self, nbytes: int, kind: str = "activations") -> Buffer:
        ptr = self.stream.malloc(nbytes)
        self.ledger.add(ptr, nbytes, kind)
        return Buffer(ptr, nbytes)

    def free(self, buffer: Buffer) -> None:
        self.stream.free(int(buffer.handle))
        self.ledger.remove(int(buffer.handle))

    def upload(self, dst: View, host: np.ndarray) -> None:
        host = np.asarray(host, dtype=dst.dtype)
        assert host.shape == tuple(dst.shape), f"upload of {host.shape} into a {dst.shape} view"
        self.stream.upload(view_address(dst), host)

    def download(self, src: View) -> np.ndarray:
        return self.stream.download(view_address(src), tuple(src.shape), src.dtype)

    def copy2d(self, dst: Buffer, dst_offset: int, dst_pitch: int, src: Buffer, src_offset: int, src_pitch: int,
               width: int, height: int) -> None:
        cuda_memory.check_2d("copy2d destination", dst.nbytes, dst_offset, dst_pitch, width, height)
        cuda_memory.check_2d("copy2d source", src.nbytes, src_offset, src_pitch, width, height)
        self.stream.copy2d(int(dst.handle) + dst_offset, dst_pitch, int(src.handle) + src_offset, src_pitch,
                           width, height)

    def run(self, profile: int, bindings: Mapping[str, View]) -> None:
        plan = binding_plan(self.io, bindings)
        ctx, stream = self.context, self.stream.ptr
        if profile != self._profile:
            _ok(ctx.set_optimization_profile_async(profile, stream), f"set_optimization_profile_async({profile})")
            self._profile, self._shapes = profile, {}
        for b in plan:
            if b.is_input and self._shapes.get(b.name) != b.shape:
                _ok(ctx.set_input_shape(b.name, b.shape), f"set_input_shape({b.name}, {list(b.shape)})")
                self._shapes[b.name] = b.shape
            _ok(ctx.set_tensor_address(b.name, b.address), f"set_tensor_address({b.name})")
        if self.graphs is None:
            _ok(ctx.execute_async_v3(stream), "execute_async_v3")
            return
        key = GraphCache.key(profile, plan)
        action = self.graphs.action(key)
        if action == "replay":
            self.stream.launch(self.graphs.graphs[key][1])
        elif action == "capture":
            self.stream.begin_capture()
            try:
                _ok(ctx.execute_async_v3(stream), "execute_async_v3 (captured)")
            finally:
                graph = self.stream.end_capture()
            for old in self.graphs.add(key, graph):
                self.stream.destroy_graph(*old)
            self.stream.launch(graph[1])
        else:
            _ok(ctx.execute_async_v3(stream), "execute_async_v3")

    def synchronize(self) -> None:
        self.stream.synchronize()

    def memory_bytes(self) -> dict[str, int]:
        """{"engine", "activations", "kv_cache"}: bytes of the real allocations (telemetry's memory_bytes{kind})."""
        return {"engine": 0, "activations": 0, "kv_cache": 0, **self.ledger.totals()}

    def close(self) -> None:
        self.synchronize()
        for graph in (self.graphs.clear() if self.graphs else []):
            self.stream.destroy_graph(*graph)
        if self._runtime_cache is not None:  # JIT kernels for the next start (written whole, then renamed)
            from trt_gemma.fsutil import atomic_write  # a new temp file, never through a link in the bundle

            atomic_write(self.bundle / "tensorrt" / RUNTIME_CACHE, bytes(memoryview(self._runtime_cache.serialize())))
        self.context = None
        for ptr in list(self.ledger.by_ptr):
            self.stream.free(ptr)
            self.ledger.remove(ptr)
        self.engine = None
        self.stream.close()


# --- thin TensorRT calls -------------------------------------------------------------------------------------------

def engine_io(engine, trt) -> dict:
    """The engine's tensors and input profile ranges in the build record's format (engine_plan.io_mismatches)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    tensors = [{"name": n, "dtype": numpy_dtype(engine.get_tensor_dtype(n)),
                "shape": [int(d) for d in engine.get_tensor_shape(n)],
                "is_input": engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT} for n in names]
    profiles = {str(p): {t["name"]: [[int(d) for d in s] for s in engine.get_tensor_profile_shape(t["name"], p)]
                         for t in tensors if t["is_input"] and -1 in t["shape"]}
                for p in range(engine.num_optimization_profiles)}
    return {"tensors": tensors, "profiles": profiles}


def _ok(result: bool, call: str) -> None:
    if not result:
        raise DeviceError(f"IExecutionContext.{call} returned False", fix="see the TensorRT log lines above")


def _first(errors: list[str]) -> str:
    return " | ".join(errors[:2]) or "no message from TensorRT"
