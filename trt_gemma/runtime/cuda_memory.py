"""Device memory, copies, one stream and CUDA graphs through cuda-python (`cuda.bindings.runtime`), not torch.

Every call returns `(cudaError_t, *values)` (cuda-python, "CUDA Runtime API" module page); `check` turns a failure
into a DeviceError naming the call, so a failed copy says which copy. The pure parts (the result check, the bounds of
a strided copy, a view's device address) run on any host; the calls themselves need a driver and a GPU and are tested
only there (`gpu` mark).

Memory is allocated once at load (`cudaMalloc`: the pool, the engine's context memory, the step buffers), so the
stream-ordered allocator would buy nothing. Host->device copies from pageable numpy memory return once the data is
staged, so the numpy array may be freed right after (CUDA Runtime API, "API synchronization behavior", memcpy
"Asynchronous" rules); device->host copies into pageable memory are synchronous.
cuda-python 12.x matches CUDA 12 drivers (JetPack 6), 13.x needs a CUDA 13 driver (JetPack 7, recent dGPU drivers).
"""
from __future__ import annotations

import importlib.util

import numpy as np

from trt_gemma.errors import DependencyError, DeviceError

CUDA_PYTHON_INSTALL = ("pip install 'cuda-python>=12,<13' on CUDA 12 (JetPack 6), "
                       "pip install 'cuda-python>=13' on a CUDA 13 driver")
# cudaError_t name -> what the user does about it
ERROR_FIXES = {
    "cudaErrorInsufficientDriver": "this host has no NVIDIA driver new enough for this cuda-python; install the "
                                   "driver, or a cuda-python matching the installed CUDA major version",
    "cudaErrorNoDevice": "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the container's --runtime nvidia)",
    "cudaErrorMemoryAllocation": "the device is out of memory: lower max_batch_size / max_seq_len in recipe.toml and "
                                 "rebuild, or stop other GPU processes (`trt-gemma telemetry` shows the memory)",
    "cudaErrorStreamCaptureUnsupported": "this step is not capturable; run without CUDA graphs",
}


def installed() -> bool:
    """cuda-python's runtime bindings are importable (found without importing them)."""
    try:
        return any(importlib.util.find_spec(m) is not None for m in ("cuda.bindings", "cuda.cudart"))
    except ModuleNotFoundError:  # no `cuda` package at all
        return False


def cudart():
    """The cuda-python runtime module (import-guarded: cuda-python is an optional extra)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6 spelled the module this way
        except ImportError:
            raise DependencyError("the TensorRT runtime needs cuda-python for device memory and streams",
                                  fix=CUDA_PYTHON_INSTALL) from None
    return runtime


def check(call: str, result):
    """The values of a cuda-python call's `(cudaError_t, *values)` result; a DeviceError naming `call` otherwise."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise DeviceError(f"{call} failed: {name} ({int(err)})",
                          fix=ERROR_FIXES.get(name, "see the CUDA Runtime API's cudaError_t for this code"))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def check_2d(what: str, nbytes: int, offset: int, pitch: int, width: int, height: int) -> None:
    """A strided copy's rows stay inside their buffer (cudaMemcpy2DAsync would write past it silently)."""
    if width <= 0 or height <= 0 or offset < 0 or pitch < width:
        raise ValueError(f"{what}: width {width}, height {height}, offset {offset}, pitch {pitch} is not a 2-D copy")
    end = offset + (height - 1) * pitch + width
    if end > nbytes:
        raise ValueError(f"{what}: {height} rows of {width} bytes at pitch {pitch} from {offset} end at {end}, "
                         f"past the {nbytes}-byte buffer")


class CudaStream:
    """One non-blocking stream and the memory operations the executor orders on it."""

    def __init__(self, device: int = 0):
        self.rt = rt = cudart()
        check("cudaSetDevice", rt.cudaSetDevice(device))
        self.device = device
        self.handle = check("cudaStreamCreateWithFlags", rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))

    @property
    def ptr(self) -> int:
        """The stream as the integer TensorRT's Python API takes (`stream_handle: int`)."""
        return int(self.handle)

    def malloc(self, nbytes: int) -> int:
        return int(check("cudaMalloc", self.rt.cudaMalloc(max(1, nbytes))))

    def free(self, ptr: int) -> None:
        check("cudaFree", self.rt.cudaFree(ptr))

    def upload(self, dst: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        check("cudaMemcpyAsync(host->device)", self.rt.cudaMemcpyAsync(
            dst, host.ctypes.data, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle))

    def download(self, src: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        out = np.empty(shape, dtype)
        check("cudaMemcpyAsync(device->host)", self.rt.cudaMemcpyAsync(
            out.ctypes.data, src, out.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle))
        self.synchronize()
        return out

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        check("cudaMemcpy2DAsync", self.rt.cudaMemcpy2DAsync(
            dst, dst_pitch, src, src_pitch, width, height, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
            self.handle))

    def synchronize(self) -> None:
        check("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(self.handle))

    def begin_capture(self) -> None:
        check("cudaStreamBeginCapture", self.rt.cudaStreamBeginCapture(
            self.handle, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))

    def end_capture(self) -> tuple[object, object]:
        """(graph, executable graph) of what was issued since begin_capture."""
        graph = check("cudaStreamEndCapture", self.rt.cudaStreamEndCapture(self.handle))
        return graph, check("cudaGraphInstantiate", self.rt.cudaGraphInstantiate(graph, 0))

    def launch(self, graph_exec) -> None:
        check("cudaGraphLaunch", self.rt.cudaGraphLaunch(graph_exec, self.handle))

    def destroy_graph(self, graph, graph_exec) -> None:
        check("cudaGraphExecDestroy", self.rt.cudaGraphExecDestroy(graph_exec))
        check("cudaGraphDestroy", self.rt.cudaGraphDestroy(graph))

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes on the device."""
        free, total = check("cudaMemGetInfo", self.rt.cudaMemGetInfo())
        return int(free), int(total)

    def sm(self) -> tuple[int, str]:
        """(compute capability as major*10+minor, device name) of this stream's device."""
        props = check("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(self.device))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return props.major * 10 + props.minor, name.rstrip("\x00")

    def close(self) -> None:
        if self.handle is not None:
            check("cudaStreamDestroy", self.rt.cudaStreamDestroy(self.handle))
            self.handle = None
