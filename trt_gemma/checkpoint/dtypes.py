"""numpy helpers for the 16- and 8-bit float formats numpy lacks (bfloat16, float8_e4m3fn).

bfloat16 travels as uint16 bit patterns and float8_e4m3fn as uint8; these functions convert them to/from float32
with round-to-nearest-even, so no ml_dtypes/torch is needed in the core install.
"""
from __future__ import annotations

import numpy as np

# safetensors dtype string -> (numpy storage dtype, bytes per element)
ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
# model dtype names (HF/TRT-LLM) <-> safetensors dtype strings
NAME_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ST_TO_NAME = {v: k for k, v in NAME_TO_ST.items()}


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, np.uint16(0x7FC0), rounded)
    return rounded


def _fp8_e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    normal = sign * (1.0 + man / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = sign * (man / 8.0) * np.exp2(-6.0)
    vals = np.where(exp == 0, subnormal, normal)
    vals[(codes & 0x7F) == 0x7F] = np.nan  # e4m3fn: only S.1111.111 is NaN, no infinities
    return vals.astype(np.float32)


FP8_E4M3_VALUES = _fp8_e4m3_table()
FP8_E4M3_MAX = 448.0
_FP8_POS = FP8_E4M3_VALUES[:127].astype(np.float64)  # codes 0..126: the finite non-negative values, increasing


def fp8_e4m3_to_f32(codes: np.ndarray) -> np.ndarray:
    return FP8_E4M3_VALUES[np.asarray(codes, dtype=np.uint8)]


def f32_to_fp8_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn codes (uint8): saturate to ±448, round to nearest, ties to even code."""
    x = np.asarray(x, dtype=np.float32)
    a = np.minimum(np.abs(x).astype(np.float64), FP8_E4M3_MAX)
    hi = np.clip(np.searchsorted(_FP8_POS, a, side="left"), 0, 126)
    lo = np.clip(hi - 1, 0, 126)
    d_lo, d_hi = a - _FP8_POS[lo], _FP8_POS[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code = np.where(np.signbit(x), code | np.uint8(0x80), code)
    return np.where(np.isnan(x), np.uint8(0x7F), code).astype(np.uint8)


def to_f32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """Decode a raw safetensors array (as stored) to float32."""
    if st_dtype == "BF16":
        return bf16_to_f32(arr)
    if st_dtype == "F8_E4M3":
        return fp8_e4m3_to_f32(arr)
    return np.asarray(arr, dtype=np.float32)


def from_f32(x: np.ndarray, st_dtype: str) -> np.ndarray:
    """Encode float32 as the storage array of a safetensors dtype."""
    if st_dtype == "BF16":
        return f32_to_bf16(x)
    if st_dtype == "F8_E4M3":
        return f32_to_fp8_e4m3(x)
    return np.ascontiguousarray(x, dtype=ST_DTYPES[st_dtype])


def round_to(x: np.ndarray, st_dtype: str) -> np.ndarray:
    """float32 values rounded through `st_dtype` (what storing then loading does)."""
    return to_f32(from_f32(x, st_dtype), st_dtype)


def cast(block: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Storage dtype `src` -> `dst`; same dtype is a plain pass-through of the bytes. Overflow to Inf is reported
    by the finiteness check that follows, with the tensor's name."""
    if src == dst:
        return block
    with np.errstate(over="ignore"):
        return from_f32(to_f32(block, src), dst)
