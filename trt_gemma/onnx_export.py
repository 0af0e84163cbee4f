"""Export a TensorRT-LLM Gemma 2 checkpoint (ours: float, W8A16/W4A16, W4A16_AWQ, FP8; TP shards merged) to a
standard-operator ONNX graph with past/present KV cache, for onnxruntime and the TensorRT / TensorRT-RTX parsers.

One graph serves prefill and decode: `input_ids` [batch, sequence] and per layer `past_key_values.{i}.key/value`
[batch, kv_heads, past_sequence, head_size] in; `logits` [batch, sequence, vocab] (float32) and
`present.{i}.key/value` [batch, kv_heads, past_sequence + sequence, head_size] out. Positions are past_sequence ..
past_sequence + sequence - 1 (no padding inside a batch). The math is the numpy reference's (trt_gemma/reference/
model.py), quirk by quirk; activations are float32, weights keep the checkpoint's storage:

- float: the weight as stored (fp32/fp16/bf16), transposed to [in, out], Cast to float32 where needed;
- W4A16_AWQ: `DequantizeLinear(int4 [in, out], scale [in/group, out], axis=0, block_size=group)` -> MatMul, with the
  AWQ pre-quant scale as a Mul on x. TRT-LLM packs two output rows per byte ([out/2, in], low nibble = even row);
  ONNX packs consecutive elements of the flattened tensor, so the [in, out] int4 tensor's bytes are exactly the
  packed checkpoint transposed: no unpacking;
- W8A16 / W4A16 (TRT-LLM quantizes these at build): per output channel round-to-nearest exactly as the reference
  emulates it (reference/quantized.py `rtn_codes`), `DequantizeLinear(int8|int4 [in, out], scale [out], axis=1)`;
- FP8: `DequantizeLinear(float8e4m3fn [in, out], weights_scaling_factor)` and Q/DQ of the activation with
  `activation_scaling_factor`; an FP8 KV cache is a Q/DQ pair on K (after RoPE) and V before they enter the cache.

onnxruntime fuses DequantizeLinear(int4/int8) + MatMul into its MatMulNBits kernel at session creation, so the
standard graph runs at quantized speed there; TensorRT fuses the same pattern into its weight-only GEMMs.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from trt_gemma.dtypes import NAME_TO_ST, to_f32
from trt_gemma.errors import ConfigError, InputError, UnsupportedModelError
from trt_gemma.onnx_graph import Graph
from trt_gemma.reference.checkpoint import FULL, CheckpointConfig, ShardSet, is_excluded
from trt_gemma.reference.model import attention_scale, embedding_normalizer, rope_inv_freq

MIN_OPSET = 21  # int4 / blocked DequantizeLinear and float8 Q/DQ appear in opset 21
LM_HEAD_CHOICES = ("none", "int8", "int4")
LM_HEAD_GROUP = 128  # INT4 block along the input dimension where we choose it (lm_head, per-channel W4A16)
ROW_BLOCK = 8192  # vocab rows per block when streaming the embedding / lm_head
MANIFEST = "trt_gemma_onnx.json"
MODEL_FILE = "model.onnx"
ST_TO_ONNX = {"F32": "FLOAT", "F16": "FLOAT16", "BF16": "BFLOAT16"}
GELU_C = math.sqrt(2.0 / math.pi)
FIX_CKPT = "re-create the checkpoint with `trt-gemma convert` / `trt-gemma quantize`"


@dataclass
class _Ctx:
    g: Graph
    shards: ShardSet
    cfg: CheckpointConfig
    st: str  # storage dtype of float tensors (safetensors name)


# ---- linear layers, one exporter per quant_algo -----------------------------------------------------------------

def _float_weight_t(ctx: _Ctx, name: str) -> str:
    """The [in, out] float32 value of a float weight [out, in] stored as `name`."""
    info = ctx.shards.info(name)
    w = ctx.shards.get(name)
    t = ctx.g.tensor(name, np.ascontiguousarray(w.T), ST_TO_ONNX[info.dtype])
    return t if info.dtype == "F32" else ctx.g.op("Cast", t, to=_f32())


def _linear_float(ctx: _Ctx, prefix: str, x: str) -> str:
    return ctx.g.op("MatMul", x, _float_weight_t(ctx, f"{prefix}.weight"), name=prefix)


def _linear_awq(ctx: _Ctx, prefix: str, x: str) -> str:
    g, s = ctx.g, ctx.shards
    packed = s.get(f"{prefix}.weight")  # int8 [out/2, in]
    wsf = s.get_f32(f"{prefix}.weights_scaling_factor")  # [out, in/group]
    pqs = s.get_f32(f"{prefix}.prequant_scaling_factor")  # [in]
    out, inp = packed.shape[0] * 2, packed.shape[1]
    if wsf.ndim != 2 or wsf.shape[0] != out or wsf.shape[1] == 0 or pqs.shape != (inp,):
        raise InputError(f"{s.files[0]}: {prefix} has weight {list(packed.shape)}, weights_scaling_factor "
                         f"{list(wsf.shape)}, prequant_scaling_factor {list(pqs.shape)}: expected [out/2, in], "
                         "[out, in/group], [in]", fix=FIX_CKPT)
    group = _check_block(f"{prefix}.weights_scaling_factor", inp, wsf.shape[1])
    w = g.tensor(f"{prefix}.weight", np.ascontiguousarray(packed.T).view(np.uint8), "INT4", (inp, out))
    sc = g.tensor(f"{prefix}.weights_scaling_factor", np.ascontiguousarray(wsf.T))
    wd = g.op("DequantizeLinear", w, sc, axis=0, block_size=group, name=f"{prefix}.dq")
    xs = g.op("Mul", x, g.tensor(f"{prefix}.prequant_scaling_factor", pqs), name=f"{prefix}.prequant")
    return g.op("MatMul", xs, wd, name=prefix)


def _weight_only(bits: int) -> Callable[[_Ctx, str, str], str]:
    def export(ctx: _Ctx, prefix: str, x: str) -> str:
        from trt_gemma.reference.quantized import rtn_codes

        w = ctx.shards.get_f32(f"{prefix}.weight")
        q, scale = rtn_codes(w, bits, NAME_TO_ST.get(ctx.cfg.dtype, "F16"))
        return _dq_matmul_per_channel(ctx.g, prefix, x, q, scale, bits)
    return export


def _dq_matmul_per_channel(g: Graph, prefix: str, x: str, q: np.ndarray, scale: np.ndarray, bits: int) -> str:
    """y = x @ (q * scale).T for int codes q [out, in] and a per-output-channel scale [out]."""
    out, inp = q.shape
    scale = np.asarray(scale, np.float32).reshape(out)
    if bits == 8:
        w = g.tensor(f"{prefix}.weight", np.ascontiguousarray(q.T).astype(np.int8))
        sc = g.tensor(f"{prefix}.weight_scale", scale)
        return g.op("MatMul", x, g.op("DequantizeLinear", w, sc, axis=1, name=f"{prefix}.dq"), name=prefix)
    w = g.tensor(f"{prefix}.weight", pack_int4_rows(np.ascontiguousarray(q.T)), "INT4", (inp, out))
    if inp % LM_HEAD_GROUP:
        sc = g.tensor(f"{prefix}.weight_scale", scale)
        return g.op("MatMul", x, g.op("DequantizeLinear", w, sc, axis=1, name=f"{prefix}.dq"), name=prefix)
    # The same per-channel math as blocks of 128 along the input (the channel scale repeated per block): the
    # layout TensorRT's INT4 GEMMs and onnxruntime's fast MatMulNBits kernels take (a whole-row block is neither).
    sc = g.tensor(f"{prefix}.weight_scale", np.repeat(scale[None], inp // LM_HEAD_GROUP, axis=0))
    wd = g.op("DequantizeLinear", w, sc, axis=0, block_size=LM_HEAD_GROUP, name=f"{prefix}.dq")
    return g.op("MatMul", x, wd, name=prefix)


def pack_int4_rows(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] -> ONNX int4 bytes: consecutive elements of the flattened tensor, low nibble first."""
    flat = np.asarray(q, np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    lo = flat[0::2].astype(np.uint8) & np.uint8(0x0F)
    hi = (flat[1::2].astype(np.uint8) & np.uint8(0x0F)) << np.uint8(4)
    return lo | hi


def _linear_fp8(ctx: _Ctx, prefix: str, x: str) -> str:
    from trt_gemma.reference.quantized import FP8Quant, _scalar

    g, s = ctx.g, ctx.shards
    if s.info(f"{prefix}.weight").dtype != "F8_E4M3":
        raise InputError(f"{s.files[0]}: {prefix}.weight is {s.info(f'{prefix}.weight').dtype}, FP8 checkpoints "
                         "store float8_e4m3fn (F8_E4M3)", fix=FIX_CKPT)
    codes = s.get(f"{prefix}.weight")  # uint8 [out, in]
    wsf = _scalar(s, f"{prefix}.weights_scaling_factor")
    act = FP8Quant.from_scaling_factor(_scalar(s, f"{prefix}.activation_scaling_factor"))
    w = g.tensor(f"{prefix}.weight", np.ascontiguousarray(codes.T), "FLOAT8E4M3FN", codes.T.shape)
    wd = g.op("DequantizeLinear", w, g.const(wsf), name=f"{prefix}.dq")
    return g.op("MatMul", fp8_qdq(g, x, float(act.scale), f"{prefix}.act"), wd, name=prefix)


def fp8_qdq(g: Graph, x: str, scale: float, name: str) -> str:
    """e4m3 fake-quantization (saturating) of x with a per-tensor scale (ModelOpt's / the reference's FP8Quant)."""
    from onnx import TensorProto, helper

    zp = f"{name}.zero_point"
    g.initializers.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    q = g.op("QuantizeLinear", x, g.const(scale), zp, name=f"{name}.q")
    return g.op("DequantizeLinear", q, g.const(scale), name=f"{name}.dq")


LINEAR_EXPORTS: dict[str | None, Callable[[_Ctx, str, str], str]] = {
    None: _linear_float, "W4A16_AWQ": _linear_awq, "W8A16": _weight_only(8), "W4A16": _weight_only(4),
    "FP8": _linear_fp8,
}
KV_CACHE_EXPORTS = (None, "FP8")


def _check_block(what: str, in_features: int, groups: int) -> int:
    """The INT4 block size along the input dimension; blocked DequantizeLinear (and TensorRT's INT4 GEMMs) need
    whole blocks: in_features % group == 0."""
    if in_features % groups:
        raise ConfigError(f"{what}: {groups} groups over in_features {in_features} are not whole blocks, which "
                          "blocked DequantizeLinear / TensorRT INT4 weights cannot represent",
                          fix="re-quantize with `trt-gemma quantize --group-size 128`")
    return in_features // groups


def _linear(ctx: _Ctx, prefix: str, x: str) -> str:
    algo = None if is_excluded(prefix, ctx.cfg) else ctx.cfg.quant_algo
    return LINEAR_EXPORTS[algo](ctx, prefix, x)


def _f32() -> int:
    from onnx import TensorProto

    return TensorProto.FLOAT


# ---- Gemma 2 blocks ---------------------------------------------------------------------------------------------

def rms_norm(g: Graph, x: str, weight: str, eps: float, name: str) -> str:
    """x / sqrt(mean(x^2) + eps) * (1+w) (reference `rms_norm`; the checkpoint stores 1+w). Written as
    Pow/ReduceMean/Add/Sqrt/Div/Mul, the pattern onnxruntime fuses into one normalization kernel."""
    ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0)), g.const([-1], np.int64), keepdims=1)
    rms = g.op("Sqrt", g.op("Add", ms, g.const(eps)))
    return g.op("Mul", g.op("Div", x, rms), weight, name=name)


def soft_cap(g: Graph, x: str, cap: float | None) -> str:
    """tanh(x / cap) * cap (reference `soft_cap`)."""
    if cap is None:
        return x
    return g.op("Mul", g.op("Tanh", g.op("Div", x, g.const(cap))), g.const(cap))


def gelu_tanh(g: Graph, x: str) -> str:
    """GELU with the tanh approximation (reference `gelu_tanh`): ONNX Gelu(approximate='tanh'), opset 20, one node
    that onnxruntime and the TensorRT parsers implement natively."""
    return g.op("Gelu", x, approximate="tanh")


def rope(g: Graph, x: str, cos: str, sin: str) -> str:
    """rotate_half RoPE (reference `apply_rope`): x*cos + concat(-x2, x1)*sin, on [B, T, heads, d] with cos/sin
    [T, 1, d], so query and key heads rotate in one pass."""
    x1, x2 = g.op("Split", x, axis=-1, num_outputs=2, outputs=2)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


@dataclass(frozen=True)
class _Shared:
    """Values every layer reuses: rotary cos/sin of the new positions and the two attention masks."""

    cos: str
    sin: str
    masks: dict  # window (None = global) -> bool [group*T, S]


def _shared(g: Graph, cfg: CheckpointConfig, max_seq_len: int) -> _Shared:
    past = g.op("Shape", "past_key_values.0.key", start=2, end=3)
    new = g.op("Shape", "input_ids", start=1, end=2)
    total = g.op("Add", past, new)
    axis0 = g.const([0], np.int64)
    start, stop = g.op("Squeeze", past, axis0), g.op("Squeeze", total, axis0)  # Range takes scalars
    q_pos = g.op("Range", start, stop, g.const(1, np.int64))
    k_pos = g.op("Range", g.const(0, np.int64), stop, g.const(1, np.int64))
    # float32 tables as the reference computes them (positions x inv_freq in float32, then cos/sin)
    freqs = np.arange(max_seq_len, dtype=np.float32)[:, None] * rope_inv_freq(cfg.head_size, cfg.rotary_base)[None]
    emb = np.concatenate([freqs, freqs], -1)
    emb = emb[:, None, :]  # [max_seq_len, 1, d]: gathered rows broadcast over heads in [B, T, heads, d]
    cos = g.op("Gather", g.tensor("rope.cos", np.cos(emb).astype(np.float32)), q_pos, axis=0)
    sin = g.op("Gather", g.tensor("rope.sin", np.sin(emb).astype(np.float32)), q_pos, axis=0)
    diff = g.op("Sub", g.op("Unsqueeze", q_pos, g.const([1], np.int64)),
                g.op("Unsqueeze", k_pos, g.const([0], np.int64)))  # [T, S]: query pos - key pos
    causal = g.op("GreaterOrEqual", diff, g.const(0, np.int64))
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    reps = g.const([group, 1], np.int64)  # scores are [B, kv_heads, group*T, S]: one mask row block per group
    windows = {None if not cfg.is_sliding(i) else cfg.sliding_window for i in range(cfg.num_hidden_layers)}
    masks = {}
    for w in windows:
        m = causal if w is None else g.op("And", causal, g.op("Less", diff, g.const(w, np.int64)))
        masks[w] = g.op("Tile", m, reps)
    return _Shared(cos, sin, masks)


def _attention(ctx: _Ctx, i: int, x: str, sh: _Shared) -> str:
    g, c = ctx.g, ctx.cfg
    p = f"transformer.layers.{i}.attention"
    d, nq, nkv = c.head_size, c.num_attention_heads, c.num_key_value_heads
    qkv = g.op("Reshape", _linear(ctx, f"{p}.qkv", x), g.const([0, 0, nq + 2 * nkv, d], np.int64))
    qk, v = g.op("Split", qkv, g.const([nq + nkv, nkv], np.int64), axis=2, outputs=2)
    q, k = g.op("Split", rope(g, qk, sh.cos, sh.sin), g.const([nq, nkv], np.int64), axis=2, outputs=2)
    if c.kv_cache_quant_algo == "FP8":
        from trt_gemma.reference.quantized import FP8Quant, _scalar

        kvq = FP8Quant.from_scaling_factor(_scalar(ctx.shards, f"{p}.kv_cache_scaling_factor"))
        k, v = fp8_qdq(g, k, float(kvq.scale), f"{p}.k_cache"), fp8_qdq(g, v, float(kvq.scale), f"{p}.v_cache")
    heads_first = [0, 2, 1, 3]  # [B, T, heads, d] -> [B, heads, T, d]
    k = g.op("Concat", f"past_key_values.{i}.key", g.op("Transpose", k, perm=heads_first), axis=2,
             name=f"present.{i}.key")
    v = g.op("Concat", f"past_key_values.{i}.value", g.op("Transpose", v, perm=heads_first), axis=2,
             name=f"present.{i}.value")
    g.output(k, f"present.{i}.key", "FLOAT", ["batch", nkv, "total_sequence", d])
    g.output(v, f"present.{i}.value", "FLOAT", ["batch", nkv, "total_sequence", d])
    # GQA: query head h uses kv head h // group; grouping the query heads under their kv head lets one batched
    # MatMul per kv head cover them ([B, kv, group*T, d] x [B, kv, d, S]).
    qg = g.op("Reshape", g.op("Transpose", q, perm=heads_first), g.const([0, nkv, -1, d], np.int64))
    scores = g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    scale = float(attention_scale(c.query_pre_attn_scalar))
    cap = c.attn_logit_softcapping
    if cap is None:
        scores = g.op("Mul", scores, g.const(scale))
    else:  # tanh(scores * scale / cap) * cap: the scale folded into the soft-cap's division
        scores = g.op("Mul", g.op("Tanh", g.op("Mul", scores, g.const(scale / cap))), g.const(cap))
    window = c.sliding_window if c.is_sliding(i) else None
    scores = g.op("Where", sh.masks[window], scores, g.const(-np.inf))
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B, kv, group*T, d]
    out = g.op("Transpose", g.op("Reshape", out, g.const([0, nq, -1, d], np.int64)), perm=[0, 2, 1, 3])
    return _linear(ctx, f"{p}.dense", g.op("Reshape", out, g.const([0, 0, nq * d], np.int64)))


def _block(ctx: _Ctx, i: int, x: str, sh: _Shared) -> str:
    """input_layernorm -> attention -> post_layernorm -> +x -> pre_feedforward_layernorm -> GeGLU ->
    post_feedforward_layernorm -> +x (reference `ReferenceModel._block`)."""
    g, eps, p = ctx.g, ctx.cfg.norm_epsilon, f"transformer.layers.{i}"

    def norm(t: str, n: str) -> str:
        return rms_norm(g, t, g.tensor(f"{p}.{n}.weight", ctx.shards.get_f32(f"{p}.{n}.weight")), eps, f"{p}.{n}")

    h = _attention(ctx, i, norm(x, "input_layernorm"), sh)
    x = g.op("Add", x, norm(h, "post_layernorm"), name=f"{p}.attention_residual")
    h = norm(x, "pre_feedforward_layernorm")
    act = gelu_tanh(g, _linear(ctx, f"{p}.mlp.fc", h))  # fc <- HF gate_proj (activated), gate <- HF up_proj
    h = _linear(ctx, f"{p}.mlp.proj", g.op("Mul", act, _linear(ctx, f"{p}.mlp.gate", h)))
    return g.op("Add", x, norm(h, "post_feedforward_layernorm"), name=f"{p}.mlp_residual")


# ---- embedding and lm_head ----------------------------------------------------------------------------------------

def _row_blocks(ctx: _Ctx, name: str, rows: int):
    """(start, block) row blocks of a [rows(+TP padding), H] tensor in storage dtype, one block in memory at a time
    (TP-sharded tensors are merged whole first)."""
    from trt_gemma.st_io import read_tensor

    s = ctx.shards
    if len(s.files) > 1:
        full = s.get(name)[:rows]
        for r0 in range(0, rows, ROW_BLOCK):
            yield r0, full[r0:r0 + ROW_BLOCK]
        return
    info = s.info(name)
    s.used.add(name)
    for r0 in range(0, rows, ROW_BLOCK):
        yield r0, read_tensor(s.files[0], info, rows=slice(r0, min(rows, r0 + ROW_BLOCK)))


def _copy_rows(ctx: _Ctx, name: str, rows: int) -> str:
    """The [rows, H] float table `name` as an initializer in its storage dtype, streamed."""
    info = ctx.shards.info(name)
    H = info.shape[1]
    itemsize = info.nbytes // math.prod(info.shape)
    offset = ctx.g.reserve(name, ST_TO_ONNX[info.dtype], (rows, H), rows * H * itemsize)
    for r0, block in _row_blocks(ctx, name, rows):
        ctx.g.write_at(offset + r0 * H * itemsize, memoryview(np.ascontiguousarray(block)).cast("B"))
    return name


def _same_rows(ctx: _Ctx, a: str, b: str, rows: int) -> bool:
    s = ctx.shards
    if s.info(a).dtype != s.info(b).dtype or s.info(a).shape[1:] != s.info(b).shape[1:]:
        return False
    return all(np.array_equal(x, y) for (_, x), (_, y) in zip(_row_blocks(ctx, a, rows), _row_blocks(ctx, b, rows)))


def _quantized_head(ctx: _Ctx, src: str, bits: int) -> Callable[[str], str]:
    """lm_head as int8 (per vocab row, TRT-LLM's round-to-nearest) or int4 (blocks of 128 along hidden, scale
    amax/7: the AWQ codec without the pre-scale) from the float table `src`, written in vocab row blocks straight
    into its transposed [hidden, vocab] place in the external data."""
    from trt_gemma.quant_formats import Int4AWQFormat
    from trt_gemma.reference.quantized import rtn_codes

    g, V, H, info = ctx.g, ctx.cfg.vocab_size, ctx.cfg.hidden_size, ctx.shards.info(src)
    if bits == 4 and H % LM_HEAD_GROUP:
        raise ConfigError(f"--lm-head int4: hidden_size {H} is not a multiple of {LM_HEAD_GROUP}",
                          fix="use --lm-head int8")
    name = "lm_head.weight"
    if bits == 8:
        w_off = g.reserve(name, "INT8", (H, V), H * V)
        s_off = g.reserve("lm_head.weight_scale", "FLOAT", (V,), V * 4)
    else:
        w_off = g.reserve(name, "INT4", (H, V), H * V // 2)
        s_off = g.reserve("lm_head.weight_scale", "FLOAT", (H // LM_HEAD_GROUP, V), H // LM_HEAD_GROUP * V * 4)
    for r0, block in _row_blocks(ctx, src, V):
        w = to_f32(block, info.dtype)
        if bits == 8:
            q, scale = rtn_codes(w, 8, NAME_TO_ST.get(ctx.cfg.dtype, "F16"))
            g.write_strided(w_off, V, r0, q.T.astype(np.int8))
            g.write_at(s_off + r0 * 4, scale.astype(np.float32).tobytes())
        else:
            amax = np.abs(w).reshape(w.shape[0], H // LM_HEAD_GROUP, LM_HEAD_GROUP).max(-1)
            wsf = np.where(amax > 0, amax / np.float32(7.0), np.float32(1.0)).astype(np.float32)
            packed = Int4AWQFormat.quantize(w, wsf)  # [rows/2, H], two vocab rows per byte
            g.write_strided(w_off, V // 2, r0 // 2, packed.T.view(np.uint8))
            g.write_strided(s_off, V * 4, r0 * 4, wsf.T)
    attrs = dict(axis=1) if bits == 8 else dict(axis=0, block_size=LM_HEAD_GROUP)
    wd = g.op("DequantizeLinear", name, "lm_head.weight_scale", name="lm_head.dq", **attrs)
    return lambda x: g.op("MatMul", x, wd, name="lm_head")


def _gemm_head(g: Graph, table: str, V: int, H: int) -> Callable[[str], str]:
    """x @ table.T for a [V, H] table without a transposed copy: Gemm(transB=1) on the flattened tokens."""
    def head(x: str) -> str:
        flat = g.op("Gemm", g.op("Reshape", x, g.const([-1, H], np.int64)), table, transB=1, name="lm_head")
        shape = g.op("Concat", g.op("Shape", x, start=0, end=2), g.const([V], np.int64), axis=0)
        return g.op("Reshape", flat, shape)
    return head


def _embedding_and_head(ctx: _Ctx, lm_head: str) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(gather: ids -> float32 rows, lm_head: x -> logits). A tied float head shares one float32 table with the
    gather; otherwise the gather reads the stored table and casts only the rows it took (onnxruntime would fold a
    Cast of the whole table into a float32 copy)."""
    g, c, s = ctx.g, ctx.cfg, ctx.shards
    V, H, emb_name = c.vocab_size, c.hidden_size, "transformer.vocab_embedding.weight"
    emb = _copy_rows(ctx, emb_name, V)
    cast = s.info(emb_name).dtype != "F32"

    def gather_rows(ids: str) -> str:
        rows = g.op("Gather", emb, ids, axis=0, name="embedding")
        return g.op("Cast", rows, to=_f32()) if cast else rows

    head_src = "lm_head.weight" if s.has("lm_head.weight") else emb_name
    head_quantized = s.has("lm_head.weight") and not is_excluded("lm_head", c) and c.quant_algo is not None
    if lm_head != "none":
        if head_quantized:
            raise ConfigError(f"--lm-head {lm_head}: this checkpoint's lm_head is already quantized "
                              f"({c.quant_algo})", fix="drop --lm-head")
        if head_src != emb_name:
            s.used.add(head_src)
        return gather_rows, _quantized_head(ctx, head_src, 8 if lm_head == "int8" else 4)
    if head_quantized:
        return gather_rows, lambda x: _linear(ctx, "lm_head", x)
    if head_src == emb_name or _same_rows(ctx, head_src, emb_name, V):
        s.used.add(head_src)  # tied: one float32 table for the gather and the head
        emb_f32 = g.op("Cast", emb, to=_f32(), name="embedding.cast") if cast else emb
        return (lambda ids: g.op("Gather", emb_f32, ids, axis=0, name="embedding")), _gemm_head(g, emb_f32, V, H)
    head = _copy_rows(ctx, head_src, V)
    head_f32 = head if s.info(head_src).dtype == "F32" else g.op("Cast", head, to=_f32())
    return gather_rows, _gemm_head(g, head_f32, V, H)


# ---- the stage ----------------------------------------------------------------------------------------------------

def check_options(cfg: CheckpointConfig, where: str, opset: int, lm_head: str, max_seq_len: int | None) -> int:
    """Refuse what the graph cannot represent before any work; returns the max_seq_len to use."""
    import onnx

    if cfg.quant_algo not in LINEAR_EXPORTS:
        raise UnsupportedModelError(f"{where}: quant_algo {cfg.quant_algo!r} cannot be exported to ONNX (supported: "
                                    f"{', '.join(str(k) for k in LINEAR_EXPORTS)})",
                                    fix="export an unquantized, INT8/INT4 weight-only, INT4-AWQ or FP8 checkpoint")
    if cfg.kv_cache_quant_algo not in KV_CACHE_EXPORTS:
        raise UnsupportedModelError(f"{where}: kv_cache_quant_algo {cfg.kv_cache_quant_algo!r} cannot be exported "
                                    "(supported: float, FP8)", fix="quantize with a float or FP8 KV cache")
    if lm_head not in LM_HEAD_CHOICES:
        raise ConfigError(f"--lm-head {lm_head!r} is not one of {', '.join(LM_HEAD_CHOICES)}",
                          fix="use --lm-head none, int8 or int4")
    newest = onnx.defs.onnx_opset_version()
    int4 = cfg.quant_algo in ("W4A16_AWQ", "W4A16") or lm_head == "int4"
    need, why = (MIN_OPSET, "INT4 / blocked DequantizeLinear") if int4 else \
        (20, "Gelu(approximate='tanh')")
    if opset < need or opset > newest:
        raise ConfigError(f"--opset {opset}: this graph needs opset >= {need} ({why}) and the installed onnx "
                          f"knows up to {newest}", fix=f"use --opset {max(MIN_OPSET, need)}")
    limit = cfg.max_position_embeddings
    n = limit if max_seq_len is None else max_seq_len
    if not 1 <= n <= limit:
        raise ConfigError(f"--max-seq-len {n} is outside 1..{limit} (max_position_embeddings)",
                          fix=f"use --max-seq-len <= {limit}")
    return n


def export_onnx(checkpoint: str | Path, out: str | Path, max_seq_len: int | None = None, opset: int = MIN_OPSET,
                lm_head: str = "none", force: bool = False, show_progress: bool = True) -> dict:
    """Write OUT/model.onnx (+ model.onnx.data, the tokenizer, trt_gemma_onnx.json) from a TensorRT-LLM
    checkpoint dir; returns the summary that trt_gemma_onnx.json holds. OUT appears complete or not at all."""
    from trt_gemma.console import progress
    from trt_gemma.fsutil import atomic_output_dir, check_output_target
    from trt_gemma.reference.checkpoint import check_all_used

    t0 = time.time()
    ckpt, out = Path(checkpoint), Path(out)
    cfg = CheckpointConfig.from_file(ckpt / "config.json")
    max_seq_len = check_options(cfg, str(ckpt / "config.json"), opset, lm_head, max_seq_len)
    check_output_target(out, force)
    shards = ShardSet(ckpt, cfg)
    with atomic_output_dir(out, force) as tmp:
        g = Graph(tmp / f"{MODEL_FILE}.data")
        ctx = _Ctx(g, shards, cfg, NAME_TO_ST.get(cfg.dtype, "F32"))
        with progress(disable=not show_progress) as bar:
            task = bar.add_task("exporting", total=cfg.num_hidden_layers + 2)
            _declare_io(g, cfg)
            gather, head = _embedding_and_head(ctx, lm_head)
            x = g.op("Mul", gather("input_ids"), g.const(float(embedding_normalizer(cfg.hidden_size, cfg.dtype))), name="embed_scale")
            bar.advance(task)
            sh = _shared(g, cfg, max_seq_len)
            for i in range(cfg.num_hidden_layers):
                bar.update(task, description=f"layer {i}")
                x = _block(ctx, i, x, sh)
                bar.advance(task)
            ln_f = g.tensor("transformer.ln_f.weight", shards.get_f32("transformer.ln_f.weight"))
            logits = soft_cap(g, head(rms_norm(g, x, ln_f, cfg.norm_epsilon, "ln_f")), cfg.final_logit_softcapping)
            g.output(logits, "logits", "FLOAT", ["batch", "sequence", cfg.vocab_size])
            g.outputs.sort(key=lambda v: v.name != "logits")  # logits first, then present.{i}.key/value
            check_all_used(shards)
            bar.update(task, description="writing", completed=cfg.num_hidden_layers + 2)
        g.close_data()
        summary = _summary(ckpt, cfg, max_seq_len, opset, lm_head, g)
        model = g.model("gemma2", opset, f"Gemma 2 exported by trt_gemma from {ckpt.name}",
                        {"trt_gemma": json.dumps(summary["model"])})
        _save(model, tmp / MODEL_FILE)
        _copy_tokenizer(ckpt, tmp)
        shutil.copy2(ckpt / "config.json", tmp / "checkpoint_config.json")
        summary.update(wall_s=round(time.time() - t0, 3), peak_rss_bytes=peak_rss_bytes())
        (tmp / MANIFEST).write_text(json.dumps(summary, indent=2))
    summary["path"] = str(out)
    return summary


def _declare_io(g: Graph, cfg: CheckpointConfig) -> None:
    g.input("input_ids", "INT64", ["batch", "sequence"])
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            g.input(f"past_key_values.{i}.{kv}", "FLOAT",
                    ["batch", cfg.num_key_value_heads, "past_sequence", cfg.head_size])


def _summary(ckpt: Path, cfg: CheckpointConfig, max_seq_len: int, opset: int, lm_head: str, g: Graph) -> dict:
    from trt_gemma import __version__

    model = {"num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
             "head_size": cfg.head_size, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
             "max_seq_len": max_seq_len, "dtype": cfg.dtype, "activation_dtype": "float32",
             "quant_algo": cfg.quant_algo, "kv_cache_quant_algo": cfg.kv_cache_quant_algo, "lm_head": lm_head,
             "sliding_window": cfg.sliding_window,
             "layer_types": [t if cfg.is_sliding(i) else FULL for i, t in enumerate(cfg.layer_types)]}
    return {"format": "trt_gemma-onnx/1", "producer": f"trt_gemma {__version__}", "source": str(ckpt),
            "opset": opset, "model_file": MODEL_FILE, "data_file": g.data_path.name, "model": model,
            "nodes": len(g.nodes), "initializers": len(g.initializers), "external_bytes": g.external_bytes,
            "inputs": ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(cfg.num_hidden_layers)
                                       for kv in ("key", "value")],
            "outputs": ["logits"] + [f"present.{i}.{kv}" for i in range(cfg.num_hidden_layers)
                                     for kv in ("key", "value")]}


def _save(model, path: Path) -> None:
    """Serialize the (weight-free) proto, then let onnx's checker validate it against the external data."""
    import onnx
    from onnx import helper

    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


def _copy_tokenizer(ckpt: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, dst / name)


def peak_rss_bytes() -> int:
    """Peak resident set of this process: VmHWM (per address space, so a child spawned by a big parent reports its
    own peak, unlike ru_maxrss, which survives exec), else getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    from trt_gemma.reference.generate import peak_rss_bytes as ru_maxrss

    return ru_maxrss()


def read_manifest(onnx_dir: Path) -> dict:
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{onnx_dir} has no {MANIFEST}: not an export of `trt-gemma export-onnx`",
                         fix="export it with `trt-gemma export-onnx CHECKPOINT OUT`")
    return json.loads(path.read_text())
