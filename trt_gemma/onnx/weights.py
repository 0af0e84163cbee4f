"""How checkpoint weights become ONNX initializers: one exporter per TensorRT-LLM quant_algo (the layouts table of
docs/onnx.md) and the embedding / lm_head, streamed in vocab row blocks. Used by trt_gemma/onnx/export.py.

TensorRT-LLM packs AWQ weights two output rows per byte ([out/2, in], low nibble = even row); ONNX int4 packs
consecutive elements of the flattened tensor, low nibble first (onnx/onnx docs/docsgen/source/technical/int4.md), so
the [in, out] int4 tensor's bytes are exactly the packed checkpoint transposed: no unpacking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from trt_gemma.checkpoint.dtypes import NAME_TO_ST, to_f32
from trt_gemma.errors import ConfigError, InputError
from trt_gemma.onnx.graph import Graph, to_storage
from trt_gemma.reference.checkpoint import CheckpointConfig, ShardSet, is_excluded

LM_HEAD_CHOICES = ("none", "int8", "int4")
LM_HEAD_GROUP = 128  # INT4 block along the input dimension where we choose it (lm_head, per-channel W4A16)
BLOCK_BYTES = 8 << 20  # float32 bytes of one row block when streaming the embedding / lm_head
ST_TO_ONNX = {"F32": "FLOAT", "F16": "FLOAT16", "BF16": "BFLOAT16"}
FIX_CKPT = "re-create the checkpoint with `trt-gemma convert` / `trt-gemma quantize`"


@dataclass
class Ctx:
    """What every exporter needs: the graph being built, the checkpoint's (TP-merged) tensors and its config."""

    g: Graph
    shards: ShardSet
    cfg: CheckpointConfig


# ---- linear layers, one exporter per quant_algo -----------------------------------------------------------------

def _float_weight_t(ctx: Ctx, name: str) -> str:
    """The [in, out] value, in the activation type, of a float weight [out, in] stored as `name`."""
    info = ctx.shards.info(name)
    w = ctx.shards.get(name)
    t = ctx.g.tensor(name, np.ascontiguousarray(w.T), ST_TO_ONNX[info.dtype])
    return _cast_to_act(ctx.g, t, ST_TO_ONNX[info.dtype])


def _linear_float(ctx: Ctx, prefix: str, x: str) -> str:
    return ctx.g.op("MatMul", x, _float_weight_t(ctx, f"{prefix}.weight"), name=prefix)


def _linear_awq(ctx: Ctx, prefix: str, x: str) -> str:
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
    sc = g.ftensor(f"{prefix}.weights_scaling_factor", np.ascontiguousarray(wsf.T))  # DQ's output type is its scale's
    wd = g.op("DequantizeLinear", w, sc, axis=0, block_size=group, name=f"{prefix}.dq")
    xs = g.op("Mul", x, g.ftensor(f"{prefix}.prequant_scaling_factor", pqs), name=f"{prefix}.prequant")
    return g.op("MatMul", xs, wd, name=prefix)


def _weight_only(bits: int) -> Callable[[Ctx, str, str], str]:
    def export(ctx: Ctx, prefix: str, x: str) -> str:
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
        sc = g.ftensor(f"{prefix}.weight_scale", scale)
        return g.op("MatMul", x, g.op("DequantizeLinear", w, sc, axis=1, name=f"{prefix}.dq"), name=prefix)
    w = g.tensor(f"{prefix}.weight", pack_int4_rows(np.ascontiguousarray(q.T)), "INT4", (inp, out))
    if inp % LM_HEAD_GROUP:
        sc = g.ftensor(f"{prefix}.weight_scale", scale)
        return g.op("MatMul", x, g.op("DequantizeLinear", w, sc, axis=1, name=f"{prefix}.dq"), name=prefix)
    # The same per-channel math as blocks of 128 along the input (the channel scale repeated per block): the
    # layout TensorRT's INT4 GEMMs and onnxruntime's fast MatMulNBits kernels take (a whole-row block is neither).
    sc = g.ftensor(f"{prefix}.weight_scale", np.repeat(scale[None], inp // LM_HEAD_GROUP, axis=0))
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


def _linear_fp8(ctx: Ctx, prefix: str, x: str) -> str:
    from trt_gemma.reference.quantized import FP8Quant, _scalar

    g, s = ctx.g, ctx.shards
    if s.info(f"{prefix}.weight").dtype != "F8_E4M3":
        raise InputError(f"{s.files[0]}: {prefix}.weight is {s.info(f'{prefix}.weight').dtype}, FP8 checkpoints "
                         "store float8_e4m3fn (F8_E4M3)", fix=FIX_CKPT)
    codes = s.get(f"{prefix}.weight")  # uint8 [out, in]
    wsf = _scalar(s, f"{prefix}.weights_scaling_factor")
    act = FP8Quant.from_scaling_factor(_scalar(s, f"{prefix}.activation_scaling_factor"))
    w = g.tensor(f"{prefix}.weight", np.ascontiguousarray(codes.T), "FLOAT8E4M3FN", codes.T.shape)
    wd = g.op("DequantizeLinear", w, g.fconst(wsf), name=f"{prefix}.dq")
    return g.op("MatMul", fp8_qdq(g, x, float(act.scale), f"{prefix}.act"), wd, name=prefix)


def fp8_qdq(g: Graph, x: str, scale: float, name: str) -> str:
    """e4m3 fake-quantization (saturating) of x with a per-tensor scale (ModelOpt's / the reference's FP8Quant)."""
    from onnx import TensorProto, helper

    zp = f"{name}.zero_point"
    g.initializers.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    q = g.op("QuantizeLinear", x, g.fconst(scale), zp, name=f"{name}.q")
    return g.op("DequantizeLinear", q, g.fconst(scale), name=f"{name}.dq")


LINEAR_EXPORTS: dict[str | None, Callable[[Ctx, str, str], str]] = {
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


def linear(ctx: Ctx, prefix: str, x: str) -> str:
    algo = None if is_excluded(prefix, ctx.cfg) else ctx.cfg.quant_algo
    return LINEAR_EXPORTS[algo](ctx, prefix, x)


def _cast_to_act(g: Graph, t: str, elem: str, name: str | None = None) -> str:
    """A float value of ONNX type `elem` in the activation type (no node where they agree)."""
    from trt_gemma.onnx.graph import onnx_type

    return t if elem == g.act else g.op("Cast", t, to=onnx_type(g.act), name=name)


# ---- embedding and lm_head ----------------------------------------------------------------------------------------

def _row_blocks(ctx: Ctx, name: str, rows: int):
    """(start, block) row blocks of a [rows(+TP padding), H] tensor in storage dtype, one block in memory at a time
    (TP-sharded tensors are merged whole first)."""
    from trt_gemma.checkpoint.st_io import read_tensor

    s = ctx.shards
    info = s.info(name)
    step = max(2, BLOCK_BYTES // (4 * math.prod(info.shape[1:])) // 2 * 2)  # even: int4 packs row pairs
    if len(s.files) > 1:
        full = s.get(name)[:rows]
        for r0 in range(0, rows, step):
            yield r0, full[r0:r0 + step]
        return
    s.used.add(name)
    for r0 in range(0, rows, step):
        yield r0, read_tensor(s.files[0], info, rows=slice(r0, min(rows, r0 + step)))


def _copy_rows(ctx: Ctx, name: str, rows: int) -> str:
    """The [rows, H] float table `name` as an initializer in its storage dtype, streamed."""
    info = ctx.shards.info(name)
    H = info.shape[1]
    itemsize = info.nbytes // math.prod(info.shape)
    offset = ctx.g.reserve(name, ST_TO_ONNX[info.dtype], (rows, H), rows * H * itemsize)
    for r0, block in _row_blocks(ctx, name, rows):
        ctx.g.write_at(offset + r0 * H * itemsize, memoryview(np.ascontiguousarray(block)).cast("B"))
    return name


def _same_rows(ctx: Ctx, a: str, b: str, rows: int) -> bool:
    s = ctx.shards
    if s.info(a).dtype != s.info(b).dtype or s.info(a).shape[1:] != s.info(b).shape[1:]:
        return False
    return all(np.array_equal(x, y) for (_, x), (_, y) in zip(_row_blocks(ctx, a, rows), _row_blocks(ctx, b, rows)))


def _quantized_head(ctx: Ctx, src: str, bits: int) -> Callable[[str], str]:
    """lm_head as int8 (per vocab row, TRT-LLM's round-to-nearest) or int4 (blocks of 128 along hidden, scale
    amax/7: the AWQ codec without the pre-scale) from the float table `src`, written in vocab row blocks straight
    into its transposed [hidden, vocab] place in the external data."""
    from trt_gemma.quant.formats import Int4AWQFormat
    from trt_gemma.reference.quantized import rtn_codes

    g, V, H, info = ctx.g, ctx.cfg.vocab_size, ctx.cfg.hidden_size, ctx.shards.info(src)
    if bits == 4 and (H % LM_HEAD_GROUP or V % 2):
        raise ConfigError(f"--lm-head int4: hidden_size {H} must be a multiple of {LM_HEAD_GROUP} and vocab_size {V} "
                          "even (int4 packs two vocab rows per byte)", fix="use --lm-head int8")
    name = "lm_head.weight"
    sb = 4 if g.act == "FLOAT" else 2  # scale bytes: the scales are in the activation type (DQ's output type)
    if bits == 8:
        w_off = g.reserve(name, "INT8", (H, V), H * V)
        s_off = g.reserve("lm_head.weight_scale", g.act, (V,), V * sb)
    else:
        w_off = g.reserve(name, "INT4", (H, V), H * V // 2)
        s_off = g.reserve("lm_head.weight_scale", g.act, (H // LM_HEAD_GROUP, V), H // LM_HEAD_GROUP * V * sb)
    for r0, block in _row_blocks(ctx, src, V):
        w = to_f32(block, info.dtype)
        if bits == 8:
            q, scale = rtn_codes(w, 8, NAME_TO_ST.get(ctx.cfg.dtype, "F16"))
            g.write_strided(w_off, V, r0, q.T.astype(np.int8))
            g.write_at(s_off + r0 * sb, to_storage(scale, g.act).tobytes())
        else:
            amax = np.abs(w).reshape(w.shape[0], H // LM_HEAD_GROUP, LM_HEAD_GROUP).max(-1)
            wsf = np.where(amax > 0, amax / np.float32(7.0), np.float32(1.0)).astype(np.float32)
            packed = Int4AWQFormat.quantize(w, wsf)  # [rows/2, H], two vocab rows per byte
            g.write_strided(w_off, V // 2, r0 // 2, packed.T.view(np.uint8))
            g.write_strided(s_off, V * sb, r0 * sb, to_storage(wsf.T, g.act))
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


def embedding_and_head(ctx: Ctx, lm_head: str) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(gather: ids -> rows in the activation type, lm_head: x -> logits). A tied float head shares one table in the
    activation type with the gather; otherwise the gather reads the stored table and casts only the rows it took
    (onnxruntime would fold a Cast of the whole table into a copy)."""
    g, c, s = ctx.g, ctx.cfg, ctx.shards
    V, H, emb_name = c.vocab_size, c.hidden_size, "transformer.vocab_embedding.weight"
    emb = _copy_rows(ctx, emb_name, V)
    emb_elem = ST_TO_ONNX[s.info(emb_name).dtype]

    def gather_rows(ids: str) -> str:
        return _cast_to_act(g, g.op("Gather", emb, ids, axis=0, name="embedding"), emb_elem)

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
        return gather_rows, lambda x: linear(ctx, "lm_head", x)
    if head_src == emb_name or _same_rows(ctx, head_src, emb_name, V):
        s.used.add(head_src)  # tied: one table in the activation type for the gather and the head
        emb_act = _cast_to_act(g, emb, emb_elem, name="embedding.cast")
        return (lambda ids: g.op("Gather", emb_act, ids, axis=0, name="embedding")), _gemm_head(g, emb_act, V, H)
    head = _copy_rows(ctx, head_src, V)
    return gather_rows, _gemm_head(g, _cast_to_act(g, head, ST_TO_ONNX[s.info(head_src).dtype]), V, H)
