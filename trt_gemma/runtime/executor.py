"""The seam between a backend that runs batched steps and the thing that executes the graph.

Everything a device runtime must decide — which optimization profile, the shapes and addresses to bind, where in the
KV pool a step's new rows go, which requests share a step — is plain Python in the backend, and it runs on a CPU host
against the onnxruntime executor. The executor that talks to TensorRT and CUDA does only what `Executor` names, so
the binding plan tested here is the one a GPU runs. The memory operations mirror the CUDA runtime calls a device
executor makes (`cudaMallocAsync`, `cudaMemcpyAsync`, `cudaMemcpy2DAsync`, `cudaStreamSynchronize`; CUDA Runtime API,
"Memory Management"); `run` mirrors TensorRT's `set_optimization_profile_async` / `set_input_shape` /
`set_tensor_address` / `execute_async_v3` (TensorRT Python API, `IExecutionContext`).

All work is ordered on one stream: `upload`, `copy2d` and `run` may return before the work is done; `download` and
`synchronize` wait for everything issued before them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the graph (or the engine's build record) declares it."""

    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", "int32", "bool", ...
    shape: tuple[int | str, ...]  # a symbolic name or -1 for a dimension fixed only at run time
    is_input: bool

    @classmethod
    def of_records(cls, records) -> tuple["TensorSpec", ...]:
        """From the I/O records an export manifest ("io") or a build record ("io"."tensors") keeps: name, dtype,
        shape, is_input."""
        return tuple(cls(t["name"], t["dtype"], tuple(t["shape"]), t["is_input"]) for t in records)


@dataclass(frozen=True)
class Buffer:
    """A block of executor memory: a device pointer (int) on a GPU executor, a numpy byte array on the CPU one."""

    handle: object
    nbytes: int


@dataclass(frozen=True)
class View:
    """A dense, C-contiguous tensor at a byte offset inside a Buffer: what is bound to a graph input or output."""

    buffer: Buffer
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def __post_init__(self):
        assert 0 <= self.offset and self.offset + self.nbytes <= self.buffer.nbytes, \
            f"view {self.shape} {self.dtype} at {self.offset} overruns a {self.buffer.nbytes}-byte buffer"


class Executor(Protocol):
    """Runs one graph; owns its memory and its stream."""

    io: tuple[TensorSpec, ...]
    num_profiles: int  # optimization profiles (1 where the runtime has none, e.g. onnxruntime)

    def alloc(self, nbytes: int, kind: str = "activations") -> Buffer:
        """`kind`: what the memory is for, as telemetry's memory_bytes{kind} names it ("kv_cache", "activations")."""

    def memory_bytes(self) -> dict[str, int]:
        """Bytes allocated by kind (the real allocations; a device executor adds the engine's own)."""

    def free(self, buffer: Buffer) -> None: ...

    def upload(self, dst: View, host: np.ndarray) -> None:
        """Host array (dst's shape and dtype) -> executor memory."""

    def download(self, src: View) -> np.ndarray:
        """Executor memory -> a new host array; waits for the work before it."""

    def copy2d(self, dst: Buffer, dst_offset: int, dst_pitch: int, src: Buffer, src_offset: int, src_pitch: int,
               width: int, height: int) -> None:
        """`height` rows of `width` bytes, row r from src_offset + r*src_pitch to dst_offset + r*dst_pitch
        (cudaMemcpy2DAsync's contract): how a step's new K/V rows land at their slots and positions in the pool."""

    def run(self, profile: int, bindings: Mapping[str, View]) -> None:
        """One execution of the graph with every input and output bound to a view (shapes taken from the views)."""

    def synchronize(self) -> None: ...

    def close(self) -> None:
        """Release every buffer and the execution context."""
