"""One linear layer of the numpy reference and the per-quant_algo format that loads it.

A leaf module: checkpoint.py (reading, TP merging) and quantized.py (the quantized formats) both build on it, so
neither has to import the other's internals back (no import cycle; tests/test_import_graph.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from trt_gemma.reference.checkpoint import ShardSet


@dataclass(frozen=True)
class Linear:
    """y = act(x) @ weight.T for a float32 weight [out, in]; `act` is an activation hook (pre-quant scale,
    fake-quant). The weight is kept transposed and contiguous ([in, out]): numpy's single-row decode matmul is
    ~4x faster that way than through a transposed view (measured with OpenBLAS on this project's CPU host)."""

    weight_t: np.ndarray
    act: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def from_weight(cls, weight: np.ndarray, act=None) -> "Linear":
        w_t = np.ascontiguousarray(np.asarray(weight, np.float32).T)
        w_t.flags.writeable = False  # shared read-only between generating threads
        return cls(w_t, act)

    @property
    def weight(self) -> np.ndarray:
        return self.weight_t.T

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.act is not None:
            x = self.act(x)
        return x @ self.weight_t


@dataclass(frozen=True)
class LinearFormat:
    """How a quant_algo stores one linear layer: `load(shards, prefix)` -> Linear (dequantized to float32)."""

    description: str
    load: Callable[[ShardSet, str], Linear]
