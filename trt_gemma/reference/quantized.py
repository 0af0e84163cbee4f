"""Quantized linear layers and the FP8 KV cache for the numpy reference, one table entry per TensorRT-LLM quant_algo.

Weights are dequantized once on load (float32 [out, in]); what quantization does to activations is an `act` hook run
on x before the GEMM. The math is the one the oracle in tests/test_quantize.py checks against: ModelOpt 0.47's
fake-quant torch model (docs/quantization.md), and, for weight-only, TensorRT-LLM's own build-time quantizer.

- W4A16_AWQ (docs/tensorrt-llm-contract.md §4):
  y = (x * prequant_scaling_factor) @ (int4 * repeat(weights_scaling_factor, group)).T.
- FP8: weight = e4m3 codes * weights_scaling_factor; x goes through e4m3 with activation_scaling_factor exactly as
  ModelOpt's `_fp8_eager` (modelopt/torch/quantization/tensor_quant.py): amax = s*448, scale = 448/amax (float32),
  e4m3(clamp(x*scale, ±448)) * (1/scale). Rounding the product rather than x/s matters: a one-ulp difference flips
  an e4m3 rounding now and then, and one flip moves a tiny model's logits by more than 1e-4.
- FP8 KV cache: keys (after RoPE) and values go through the same e4m3 round trip with the layer's
  `attention.kv_cache_scaling_factor` before they enter the cache (ModelOpt's k/v_bmm_quantizer sit there too).
- W8A16 / W4A16: the checkpoint keeps float weights and TensorRT-LLM quantizes them at build with
  `symmetric_quantize` (cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp): per output channel
  scale = max|w| / 2^(bits-1) (128 for int8, 8 for int4) stored in the model dtype, q = round-half-away(w / scale)
  clipped to [-128, 127] / [-8, 7], dequantized with the stored scale. We simulate exactly that round-to-nearest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from trt_gemma.checkpoint.dtypes import FP8_E4M3_MAX, f32_to_fp8_e4m3, fp8_e4m3_to_f32, round_to
from trt_gemma.errors import InputError
from trt_gemma.quant.formats import FP8Format, Int4AWQFormat
from trt_gemma.reference.linear import Linear, LinearFormat

if TYPE_CHECKING:  # the shard reader is passed in by checkpoint.py; importing it here would make a cycle
    from trt_gemma.reference.checkpoint import ShardSet

FIX = "re-create the checkpoint with `trt-gemma quantize`"


@dataclass(frozen=True)
class FP8Quant:
    """e4m3 fake-quantization with a per-tensor scale, ModelOpt's arithmetic (see the module docstring)."""

    scale_inv: np.float32  # 448 / amax
    scale: np.float32      # 1 / scale_inv

    @classmethod
    def from_scaling_factor(cls, s: float) -> "FP8Quant":
        amax = np.float32(np.float32(s) * np.float32(FP8_E4M3_MAX))
        scale_inv = np.float32(np.float32(FP8_E4M3_MAX) / amax)
        return cls(scale_inv, np.float32(np.float32(1.0) / scale_inv))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = np.clip(np.asarray(x, np.float32) * self.scale_inv, -FP8_E4M3_MAX, FP8_E4M3_MAX)
        return fp8_e4m3_to_f32(f32_to_fp8_e4m3(y)) * self.scale


@dataclass(frozen=True)
class PreQuantScale:
    """AWQ's per-input-channel activation scale, multiplied into x before the GEMM (TRT-LLM layers.py)."""

    scale: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale


def _scalar(shards: ShardSet, name: str) -> float:
    v = shards.get_f32(name).reshape(-1)
    if v.size != 1 or not np.isfinite(v[0]) or v[0] <= 0:
        raise InputError(f"{shards.files[0]}: {name} must be one finite positive float32, got {v[:4].tolist()}",
                         fix=FIX)
    return float(v[0])


def load_awq(shards: ShardSet, prefix: str) -> Linear:
    packed = shards.get(f"{prefix}.weight")
    wsf = shards.get_f32(f"{prefix}.weights_scaling_factor")
    pqs = shards.get_f32(f"{prefix}.prequant_scaling_factor")
    out, inp = packed.shape[0] * 2, packed.shape[1]
    if wsf.ndim != 2 or wsf.shape[0] != out or wsf.shape[1] == 0 or inp % wsf.shape[1] or pqs.shape != (inp,):
        raise InputError(f"{shards.files[0]}: {prefix} has weight {list(packed.shape)}, weights_scaling_factor "
                         f"{list(wsf.shape)}, prequant_scaling_factor {list(pqs.shape)}: expected [out/2, in], "
                         "[out, in/group], [in]", fix=FIX)
    for name, arr in (("weights_scaling_factor", wsf), ("prequant_scaling_factor", pqs)):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{shards.files[0]}: {prefix}.{name} has NaN/Inf values", fix=FIX)
    weight = Int4AWQFormat.dequantize(packed, wsf)
    return Linear.from_weight(weight, PreQuantScale(pqs))


def load_fp8(shards: ShardSet, prefix: str) -> Linear:
    codes = shards.get(f"{prefix}.weight")
    if shards.info(f"{prefix}.weight").dtype != "F8_E4M3":
        raise InputError(f"{shards.files[0]}: {prefix}.weight is {shards.info(f'{prefix}.weight').dtype}, "
                         "FP8 checkpoints store float8_e4m3fn (F8_E4M3)", fix=FIX)
    if np.any((codes & 0x7F) == 0x7F):
        raise InputError(f"{shards.files[0]}: {prefix}.weight contains FP8 NaN codes", fix=FIX)
    wsf = _scalar(shards, f"{prefix}.weights_scaling_factor")
    asf = _scalar(shards, f"{prefix}.activation_scaling_factor")
    weight = FP8Format.dequantize(codes, wsf)
    return Linear.from_weight(weight, FP8Quant.from_scaling_factor(asf))


def rtn_weight_only(w: np.ndarray, bits: int, scale_dtype: str) -> np.ndarray:
    """TRT-LLM `symmetric_quantize` then dequantize (see `rtn_codes`)."""
    q, scale = rtn_codes(w, bits, scale_dtype)
    return (q * scale[:, None]).astype(np.float32)


def rtn_codes(w: np.ndarray, bits: int, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """TRT-LLM `symmetric_quantize`: per output row scale max|w|/2^(bits-1), stored in the model dtype (returned as
    float32 [out]); round half away from zero (C `round`), clip to the signed range (int8 codes [out, in])."""
    q_max = float(1 << (bits - 1))
    scale = (np.max(np.abs(w), axis=1, keepdims=True) * np.float32(1.0 / q_max)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    t = w / safe
    q = np.clip(np.sign(t) * np.floor(np.abs(t) + np.float32(0.5)), -q_max, q_max - 1)
    return q.astype(np.int8), round_to(scale, scale_dtype)[:, 0]


def _weight_only(bits: int) -> Callable[[ShardSet, str], Linear]:
    def load(shards: ShardSet, prefix: str) -> Linear:
        from trt_gemma.checkpoint.dtypes import NAME_TO_ST

        w = shards.get_f32(f"{prefix}.weight")
        return Linear.from_weight(rtn_weight_only(w, bits, NAME_TO_ST.get(shards.cfg.dtype, "F16")))
    return load


QUANT_LINEAR_FORMATS: dict[str, LinearFormat] = {
    "W4A16_AWQ": LinearFormat("int4 AWQ: packed int4 x group scale, pre-quant activation scale", load_awq),
    "FP8": LinearFormat("FP8 e4m3 weight and activations, per-tensor scales", load_fp8),
    "W8A16": LinearFormat("float weights, int8 per-channel RTN as TRT-LLM builds it", _weight_only(8)),
    "W4A16": LinearFormat("float weights, int4 per-channel RTN as TRT-LLM builds it", _weight_only(4)),
}


def _fp8_kv(shards: ShardSet, layer: int) -> FP8Quant:
    return FP8Quant.from_scaling_factor(_scalar(shards, f"transformer.layers.{layer}.attention.kv_cache_scaling_factor"))


# kv_cache_quant_algo -> loader of one layer's KV fake-quantizer (applied to K after RoPE and to V).
KV_CACHE_QUANT: dict[str, Callable[[ShardSet, int], Callable[[np.ndarray], np.ndarray]]] = {"FP8": _fp8_kv}


def kv_cache_quantizer(shards: ShardSet, layer: int) -> Callable[[np.ndarray], np.ndarray] | None:
    algo = shards.cfg.kv_cache_quant_algo
    return None if algo is None else KV_CACHE_QUANT[algo](shards, layer)


ROW_PARALLEL = (".attention.dense.", ".mlp.proj.")  # split on in_features (dim 1 of the weight)


def merge_quant_scales(name: str, parts: list[np.ndarray]) -> np.ndarray | None:
    """TP merge of quantization tensors whose split differs from the weight's (None: not one of them).
    Per-tensor scales ([1]) are replicated on every rank; AWQ's prequant_scaling_factor [in] follows in_features
    (split on row-parallel linears, replicated on column-parallel ones); AWQ's weights_scaling_factor [out, in/g] of a
    row-parallel linear splits on dim 1 like its weight (column-parallel ones split on dim 0, the default rule)."""
    row_parallel = any(k in name for k in ROW_PARALLEL)
    if parts[0].size == 1 and name.endswith("_scaling_factor"):
        if any(not np.array_equal(p, parts[0]) for p in parts[1:]):
            raise InputError(f"{name} differs between TP ranks ({[float(p.reshape(-1)[0]) for p in parts]}); the "
                             "reference merges ranks and needs one per-tensor scale", fix=FIX)
        return parts[0]
    if name.endswith(".prequant_scaling_factor"):
        return np.concatenate(parts) if row_parallel else parts[0]
    if name.endswith(".weights_scaling_factor") and row_parallel:
        return np.concatenate(parts, axis=1)
    return None
