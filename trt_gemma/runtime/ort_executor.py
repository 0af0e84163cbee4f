"""The CPU executor: runtime/executor.py's `Executor` over an onnxruntime session.

Buffers are numpy byte arrays, a View is a zero-copy numpy view of one, and `run` binds every view by address through
onnxruntime's IO binding (`bind_input` / `bind_output` with `buffer_ptr`: onnxruntime reads the inputs and writes
the outputs in place, nothing is copied in or out). The step-loop backend that drives it is the one a TensorRT
executor runs under, so what the tests check here (binding plan, pool writes, sampling) is what a GPU runs.
onnxruntime runs synchronously, so `upload`, `copy2d` and `run` are done when they return; `synchronize` has nothing
to wait for.

With `profiles` (an engine's, from its build record) it keeps TensorRT's rule that a run's input shapes lie inside
the optimization profile it names, and refuses a run that breaks it as `set_input_shape` would: the CPU tests of the
TensorRT backend then check the profile index and step shapes the GPU gets.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from trt_gemma.errors import InputError
from trt_gemma.runtime.executor import Buffer, TensorSpec, View

BINDING_CACHE = 64  # binding plans kept (one per step shape: bucket x batch x new tokens)


def specs_from_manifest(man: dict) -> tuple[TensorSpec, ...]:
    """The graph's I/O as the export recorded it (trt_gemma_onnx.json "io")."""
    return TensorSpec.of_records(man.get("io", ()))


class OrtExecutor:
    """One onnxruntime session behind the Executor protocol. Thread-safe for `run` (a binding plan is built and
    kept per bindings mapping; onnxruntime sessions take concurrent runs)."""

    def __init__(self, session, io: tuple[TensorSpec, ...], profiles: list[Mapping] | None = None):
        self.session, self.io = session, io
        self.profiles = list(profiles or ())
        self.num_profiles = max(1, len(self.profiles))
        self._bindings: dict[tuple[int, int], tuple[Mapping[str, View], object]] = {}
        self._lock = threading.Lock()
        self._bytes: dict[int, tuple[str, int]] = {}  # id(buffer's array) -> (kind, bytes)

    @classmethod
    def open(cls, onnx_dir: Path, session_options=None, providers: list[str] | None = None,
             profiles: list[Mapping] | None = None) -> "OrtExecutor":
        import onnxruntime as ort

        from trt_gemma.onnx.export import read_manifest

        man = read_manifest(Path(onnx_dir))
        sess = ort.InferenceSession(str(Path(onnx_dir) / man["model_file"]), session_options,
                                    providers=providers or ["CPUExecutionProvider"])
        return cls(sess, specs_from_manifest(man), profiles)

    # ---- memory ----
    def alloc(self, nbytes: int, kind: str = "activations") -> Buffer:
        # np.zeros maps untouched pages lazily, so a large pool costs memory only where rows are written
        buf = Buffer(np.zeros(max(int(nbytes), 1), np.uint8), int(nbytes))
        self._bytes[id(buf.handle)] = (kind, int(nbytes))
        return buf

    def memory_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind, n in self._bytes.values():
            out[kind] = out.get(kind, 0) + n
        return out

    def free(self, buffer: Buffer) -> None:
        """numpy memory goes when the last reference does (cached bindings holding it are dropped here)."""
        self._bytes.pop(id(buffer.handle), None)
        with self._lock:
            self._bindings = {k: v for k, v in self._bindings.items()
                              if all(view.buffer is not buffer for view in v[0].values())}

    @staticmethod
    def array(view: View) -> np.ndarray:
        """The numpy view (no copy) of a View."""
        return np.ndarray(view.shape, np.dtype(view.dtype), view.buffer.handle, view.offset)

    def upload(self, dst: View, host: np.ndarray) -> None:
        self.array(dst)[...] = host

    def download(self, src: View) -> np.ndarray:
        return self.array(src).copy()

    def copy2d(self, dst: Buffer, dst_offset: int, dst_pitch: int, src: Buffer, src_offset: int, src_pitch: int,
               width: int, height: int) -> None:
        if height <= 0 or width <= 0:
            return
        assert width <= dst_pitch or height == 1, "copy2d: rows overlap in the destination"
        d = np.ndarray((height, width), np.uint8, dst.handle, dst_offset, (dst_pitch, 1))
        s = np.ndarray((height, width), np.uint8, src.handle, src_offset, (src_pitch, 1))
        d[...] = s

    # ---- execution ----
    def run(self, profile: int, bindings: Mapping[str, View]) -> None:
        assert 0 <= profile < self.num_profiles, f"profile {profile} of {self.num_profiles}"
        key = (id(bindings), profile)
        cached = self._bindings.get(key)
        if cached is None or cached[0] is not bindings:
            if self.profiles:
                self._check_profile(profile, bindings)
            cached = (bindings, self._bind(bindings))
            with self._lock:
                if len(self._bindings) >= BINDING_CACHE:
                    self._bindings.pop(next(iter(self._bindings)))
                self._bindings[key] = cached
        self.session.run_with_iobinding(cached[1])

    def _check_profile(self, profile: int, bindings: Mapping[str, View]) -> None:
        for name, (lo, _opt, hi) in self.profiles[profile].items():
            shape = tuple(bindings[name].shape)
            if len(shape) != len(lo) or not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
                raise InputError(f"{name} of shape {list(shape)} is outside optimization profile {profile} "
                                 f"({list(lo)}..{list(hi)})", fix="pick the profile with select_profile")

    def _bind(self, bindings: Mapping[str, View]):
        binding = self.session.io_binding()
        inputs = {s.name for s in self.io if s.is_input}
        for name, v in bindings.items():
            ptr = v.buffer.handle.ctypes.data + v.offset
            bind = binding.bind_input if name in inputs else binding.bind_output
            bind(name, "cpu", 0, np.dtype(v.dtype).type, list(v.shape), ptr)
        return binding

    def synchronize(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._bindings.clear()
        self.session = None
