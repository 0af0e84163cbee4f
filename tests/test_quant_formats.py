"""Quant format codecs against the layout written in docs/tensorrt-llm-contract.md §4 and ml_dtypes."""
import ml_dtypes
import numpy as np
import pytest

from trt_gemma.checkpoint.dtypes import f32_to_bf16, bf16_to_f32, f32_to_fp8_e4m3, fp8_e4m3_to_f32
from trt_gemma.quant.formats import FORMATS, Int4AWQFormat, pack_int4, unpack_int4


def test_int4_nibble_order_matches_reference():
    # packed[j, i]: low nibble = output row 2j, high nibble = row 2j+1, two's complement.
    q = np.array([[1, -1], [-8, 7], [3, 0], [-2, 5]], dtype=np.int8)  # [out=4, in=2]
    packed = pack_int4(q)
    assert packed.shape == (2, 2) and packed.dtype == np.int8
    assert packed.view(np.uint8)[0, 0] == (1 & 0xF) | ((-8 & 0xF) << 4)
    assert packed.view(np.uint8)[0, 1] == (-1 & 0xF) | ((7 & 0xF) << 4)
    assert packed.view(np.uint8)[1, 1] == (0 & 0xF) | ((5 & 0xF) << 4)
    np.testing.assert_array_equal(unpack_int4(packed), q)


def test_int4_round_trip_all_values():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(64, 256)).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(q[:63])


def test_awq_quantize_dequantize_error_bounded_by_half_step():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(32, 256)).astype(np.float32)
    wsf = np.abs(w).reshape(32, 2, 128).max(-1) / 7
    deq = Int4AWQFormat.dequantize(Int4AWQFormat.quantize(w, wsf), wsf)
    step = np.repeat(wsf, 128, axis=1)
    err = np.abs(deq - w)
    assert (err <= step / 2 + 1e-6).all(), f"max err/step {np.max(err / step):.3f}"


def test_fp8_codec_matches_ml_dtypes_exhaustively():
    codes = np.arange(256, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    ours = fp8_e4m3_to_f32(codes)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_array_equal(ours[~np.isnan(ours)], ref[~np.isnan(ref)])
    x = np.random.default_rng(2).normal(scale=100, size=20000).astype(np.float32)
    x = np.concatenate([x, [0.0, -0.0, 447.9, 448.0, 500.0, -1e6, 2.0**-9, 2.0**-10, 1.0625, 1.1875]]).astype(np.float32)
    ref_codes = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    ours_codes = f32_to_fp8_e4m3(x)
    bad = np.flatnonzero(ours_codes != ref_codes)
    assert bad.size == 0, f"{bad.size} mismatches, first x={x[bad[:5]]} ours={ours_codes[bad[:5]]} ref={ref_codes[bad[:5]]}"


def test_bf16_round_trip_matches_ml_dtypes():
    x = np.random.default_rng(3).normal(scale=3, size=10000).astype(np.float32)
    ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16(x), ref)
    np.testing.assert_array_equal(bf16_to_f32(ref), x.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_engine_bytes_for_gemma2_2b_qkv():
    # docs/tensorrt-llm-contract.md §4 arithmetic: qkv [4096, 2304] -> packed [2048, 2304], wsf [4096, 18], pqs [2304]
    awq = FORMATS["int4_awq"]
    specs = awq.checkpoint_tensors("transformer.layers.0.attention.qkv", 4096, 2304, "bfloat16")
    assert [s[2] for s in specs] == [(2048, 2304), (4096, 18), (2304,)]
    assert awq.engine_bytes(4096, 2304) == 4096 * 2304 // 2 + 4096 * 18 * 2 + 2304 * 2
    assert FORMATS["bfloat16"].engine_bytes(4096, 2304) == 4096 * 2304 * 2
    assert FORMATS["fp8"].checkpoint_tensors("x", 8, 128, "bfloat16")[0] == ("x.weight", "F8_E4M3", (8, 128))


def test_fp8_format_round_trip_matches_ml_dtypes():
    from trt_gemma.quant.formats import FP8Format

    w = np.random.default_rng(4).normal(scale=0.05, size=(16, 128)).astype(np.float32)
    wsf = float(np.abs(w).max() / 448)
    ours = FP8Format.dequantize(FP8Format.quantize(w, wsf), wsf)
    ref = (w / np.float32(wsf)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(wsf)
    diff = np.abs(ours - ref)
    assert diff.max() == 0, f"max diff {diff.max():.3g}, mean {diff.mean():.3g}"
