"""Weight formats as small classes: what a linear costs in an engine, what a checkpoint stores, and the numpy codecs.

The same classes drive the planner (bytes) and the reference runtime (dequantize), so the two cannot disagree.
Layouts follow docs/tensorrt-llm-contract.md §4 (ModelOpt's `to_quantized_weight`, TRT-LLM `layers.py`):
- W4A16_AWQ: int4 symmetric, per (out row, input group) scale = amax/7 in model dtype, packed two per byte along the
  OUTPUT dimension into int8 [out/2, in] (low nibble = even output row, high nibble = odd row, two's complement);
  plus `prequant_scaling_factor` [in] (AWQ activation scale multiplied into x before the GEMM).
- FP8: float8_e4m3fn weight [out, in], per-tensor float32 `weights_scaling_factor` [1] and `activation_scaling_factor` [1].
- W8A16 / W4A16 (weight-only, ModelOpt style): the checkpoint keeps model-dtype weights, TRT-LLM quantizes at build.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trt_gemma.checkpoint.dtypes import NAME_TO_ST, f32_to_fp8_e4m3, fp8_e4m3_to_f32

FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
KV_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1}
INT4_MAX = 7  # symmetric int4: q in [-8, 7], scale = amax / 7


@dataclass(frozen=True)
class QuantFormat:
    name: str
    quant_algo: str | None  # the TRT-LLM QuantAlgo string written in config.json

    def engine_bytes(self, out_features: int, in_features: int, group_size: int = 128) -> int:
        raise NotImplementedError

    def checkpoint_tensors(self, prefix: str, out_features: int, in_features: int, model_dtype: str,
                           group_size: int = 128) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(f"{prefix}.weight", NAME_TO_ST[model_dtype], (out_features, in_features))]


@dataclass(frozen=True)
class FloatFormat(QuantFormat):
    dtype: str = "bfloat16"

    def engine_bytes(self, out_features, in_features, group_size=128):
        return out_features * in_features * FLOAT_BYTES[self.dtype]


@dataclass(frozen=True)
class WeightOnlyFormat(QuantFormat):
    """Per-channel symmetric int8/int4 done by TRT-LLM at build: engine holds packed ints + one fp16 scale per row."""

    bits: int = 8

    def engine_bytes(self, out_features, in_features, group_size=128):
        return out_features * in_features * self.bits // 8 + out_features * 2


@dataclass(frozen=True)
class Int4AWQFormat(QuantFormat):
    def engine_bytes(self, out_features, in_features, group_size=128):
        return out_features * in_features // 2 + out_features * (in_features // group_size) * 2 + in_features * 2

    def checkpoint_tensors(self, prefix, out_features, in_features, model_dtype, group_size=128):
        st = NAME_TO_ST[model_dtype]
        return [(f"{prefix}.weight", "I8", (out_features // 2, in_features)),
                (f"{prefix}.weights_scaling_factor", st, (out_features, in_features // group_size)),
                (f"{prefix}.prequant_scaling_factor", st, (in_features,))]

    @staticmethod
    def quantize(w: np.ndarray, wsf: np.ndarray) -> np.ndarray:
        """w [out, in] float, wsf [out, in/group] -> packed int8 [out/2, in]."""
        group = w.shape[1] // wsf.shape[1]
        scale = np.repeat(np.asarray(wsf, np.float32), group, axis=1)
        q = np.clip(np.round(np.asarray(w, np.float32) / scale), -8, INT4_MAX).astype(np.int8)
        return pack_int4(q)

    @staticmethod
    def dequantize(packed: np.ndarray, wsf: np.ndarray) -> np.ndarray:
        """packed int8 [out/2, in], wsf [out, in/group] -> float32 [out, in]."""
        q = unpack_int4(packed).astype(np.float32)
        group = q.shape[1] // wsf.shape[1]
        return q * np.repeat(np.asarray(wsf, np.float32), group, axis=1)


@dataclass(frozen=True)
class FP8Format(QuantFormat):
    def engine_bytes(self, out_features, in_features, group_size=128):
        return out_features * in_features + 8

    def checkpoint_tensors(self, prefix, out_features, in_features, model_dtype, group_size=128):
        return [(f"{prefix}.weight", "F8_E4M3", (out_features, in_features)),
                (f"{prefix}.weights_scaling_factor", "F32", (1,)),
                (f"{prefix}.activation_scaling_factor", "F32", (1,))]

    @staticmethod
    def quantize(w: np.ndarray, wsf: float) -> np.ndarray:
        """w float -> float8_e4m3fn codes (uint8) of w / wsf (saturating at ±448)."""
        return f32_to_fp8_e4m3(np.asarray(w, np.float32) / np.float32(wsf))

    @staticmethod
    def dequantize(codes: np.ndarray, wsf: float) -> np.ndarray:
        return fp8_e4m3_to_f32(codes) * np.float32(wsf)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], shape [out, in] (out even) -> int8 [out/2, in]; low nibble = row 2j, high = row 2j+1."""
    q = np.asarray(q, dtype=np.int8)
    if q.shape[0] % 2:
        raise ValueError(f"int4 packing needs an even number of output rows, got {q.shape[0]}")
    lo = q[0::2].astype(np.uint8) & np.uint8(0x0F)
    hi = (q[1::2].astype(np.uint8) & np.uint8(0x0F)) << np.uint8(4)
    return (lo | hi).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """int8/uint8 [out/2, in] -> int8 [out, in] with two's-complement nibbles sign-extended."""
    b = np.asarray(packed).view(np.uint8)
    lo = (b & np.uint8(0x0F)).astype(np.int8)
    hi = (b >> np.uint8(4)).astype(np.int8)
    lo = np.where(lo > 7, lo - 16, lo).astype(np.int8)
    hi = np.where(hi > 7, hi - 16, hi).astype(np.int8)
    out = np.empty((b.shape[0] * 2,) + b.shape[1:], dtype=np.int8)
    out[0::2], out[1::2] = lo, hi
    return out


FORMATS: dict[str, QuantFormat] = {
    "float32": FloatFormat("float32", None, "float32"),
    "bfloat16": FloatFormat("bfloat16", None, "bfloat16"),
    "float16": FloatFormat("float16", None, "float16"),
    "int8_wo": WeightOnlyFormat("int8_wo", "W8A16", 8),
    "int4_wo": WeightOnlyFormat("int4_wo", "W4A16", 4),
    "int4_awq": Int4AWQFormat("int4_awq", "W4A16_AWQ"),
    "fp8": FP8Format("fp8", "FP8"),
}
