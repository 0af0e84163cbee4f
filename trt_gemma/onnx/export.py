"""Export a TensorRT-LLM Gemma 2 checkpoint (ours: float, W8A16/W4A16, W4A16_AWQ, FP8; TP shards merged) to a
standard-operator ONNX graph with past/present KV cache, for onnxruntime and the TensorRT / TensorRT-RTX parsers.

One graph serves prefill and decode: `input_ids` [batch, sequence] and per layer `past_key_values.{i}.key/value`
[batch, kv_heads, past_sequence, head_size] in; `logits` [batch, 1, vocab] (float32; the last position, or
[batch, sequence, vocab] with logits="all") and
`present.{i}.key/value` [batch, kv_heads, past_sequence + sequence, head_size] out. Positions are past_sequence ..
past_sequence + sequence - 1 (no padding inside a batch). The math is the numpy reference's (trt_gemma/reference/
model.py), quirk by quirk; activations are float32 (or `activations` float16 / bfloat16, for TensorRT: RMSNorm and
the final soft-cap stay float32), weights keep the checkpoint's storage:

- float: the weight as stored (fp32/fp16/bf16), transposed to [in, out], Cast to the activation type where needed;
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trt_gemma.errors import ConfigError, DependencyError, InputError, UnsupportedModelError
from trt_gemma.onnx import pool
from trt_gemma.onnx.graph import ACTIVATION_TYPES, Graph, onnx_type
from trt_gemma.onnx.sites import add_site_outputs, parse_site_outputs
from trt_gemma.onnx.weights import (KV_CACHE_EXPORTS, LINEAR_EXPORTS, LM_HEAD_CHOICES, Ctx, embedding_and_head,
                                    fp8_qdq, linear)
from trt_gemma.reference.checkpoint import FULL, CheckpointConfig, ShardSet
from trt_gemma.reference.model import attention_scale, embedding_normalizer, rope_inv_freq
from trt_gemma.safe_io import check_tree, copy_in, read_json_object, resolve_in

MIN_OPSET = 21  # int4 / blocked DequantizeLinear and float8 Q/DQ appear in opset 21
# From opset 23 RMSNormalization and RotaryEmbedding replace 5 and 6 nodes each (onnxruntime and TensorRT-RTX 1.7's
# parser take both). Opset 23's Attention is not used: TensorRT's parser refuses its softcap, which Gemma 2 needs,
# and onnxruntime's CPU kernel for it measured no faster than the decomposed form (docs/onnx.md).
FUSED_OPSET = 23
# "concat": present = past ++ new (the standard layout); "inplace": past/present are one fixed-capacity buffer per
# layer that the new rows are scattered into, so a runtime can bind both to the same memory; "pool": batched steps
# over a runtime-owned KV pool, per-row positions, only the new rows out (trt_gemma/onnx/pool.py, docs/onnx.md).
KV_CACHE_LAYOUTS = ("concat", "inplace", "pool")
# "last": logits of the last new position only, [batch, 1, vocab] (generation, scoring: the final norm and the lm_head
# run on one row, so a 1024-token prefill neither computes nor returns 1024 x vocab float32 logits);
# "all": every new position, [batch, sequence, vocab] (perplexity / eval over a window).
LOGITS_CHOICES = ("last", "all")
# the dtype the graph computes in (weights keep their storage; RMSNorm and the final soft-cap run in float32 and the
# logits output is float32 in every variant). onnxruntime's CPU EP has float16 kernels but no bfloat16 ones.
ACTIVATIONS = tuple(ACTIVATION_TYPES)
# option -> (its values, the fix for any other): checked before any work
CHOICE_OPTIONS = {
    "--activations": (ACTIVATIONS, "use --activations float32 (CPU), float16 or bfloat16 (TensorRT)"),
    "--logits": (LOGITS_CHOICES, "use --logits last (generation) or all (perplexity over every position)"),
    "--kv-cache": (KV_CACHE_LAYOUTS, "use --kv-cache concat (standard past/present), inplace or pool (batched)"),
    "--lm-head": (LM_HEAD_CHOICES, "use --lm-head none, int8 or int4"),
}
MANIFEST = "trt_gemma_onnx.json"
MODEL_FILE = "model.onnx"


# ---- Gemma 2 blocks ---------------------------------------------------------------------------------------------

def rms_norm(g: Graph, x: str, weight: str, eps: float, name: str) -> str:
    """x / sqrt(mean(x^2) + eps) * (1+w) (reference `rms_norm`; the checkpoint stores 1+w). Written as
    Pow/ReduceMean/Add/Sqrt/Div/Mul, the pattern onnxruntime fuses into one normalization kernel. Always in float32
    with a float32 weight, as HF's Gemma2RMSNorm computes it: in float16 x^2 overflows past |x| = 256, which Gemma 2's
    residual stream reaches; an fp16/bf16 graph casts in and out."""
    x32 = x if g.act == "FLOAT" else g.op("Cast", x, to=onnx_type("FLOAT"))
    if g.opset >= FUSED_OPSET:  # the same math as one node (stash_type 1: float32 inside)
        out = g.op("RMSNormalization", x32, weight, axis=-1, epsilon=float(eps),
                   name=name if g.act == "FLOAT" else None)
        return g.to_act(out, name)
    ms = g.op("ReduceMean", g.op("Pow", x32, g.const(2.0)), g.const([-1], np.int64), keepdims=1)
    rms = g.op("Sqrt", g.op("Add", ms, g.const(eps)))
    out = g.op("Mul", g.op("Div", x32, rms), weight, name=name if g.act == "FLOAT" else None)
    return g.to_act(out, name)


def soft_cap(g: Graph, x: str, cap: float | None) -> str:
    """tanh(x / cap) * cap (reference `soft_cap`), on float32 logits."""
    if cap is None:
        return x
    return g.op("Mul", g.op("Tanh", g.op("Div", x, g.const(cap))), g.const(cap))


def gelu_tanh(g: Graph, x: str) -> str:
    """GELU with the tanh approximation (reference `gelu_tanh`): ONNX Gelu(approximate='tanh'), opset 20, one node
    that onnxruntime and the TensorRT parsers implement natively."""
    return g.op("Gelu", x, approximate="tanh")


def rope(g: Graph, x: str, sh: "_Shared") -> str:
    """rotate_half RoPE (reference `apply_rope`): x*cos + concat(-x2, x1)*sin, on [B, heads, T, d], so query and key
    heads rotate in one pass. From opset 23 the RotaryEmbedding operator (non-interleaved: rotate_half) with the
    [max_seq_len, d/2] tables and the positions; before, cos/sin are the gathered [T, d] rows. (One Gather of the
    swapped halves with a sign-folded sin table is fewer nodes but measured slower on onnxruntime's CPU EP: its
    last-axis Gather is a generic loop.)"""
    if sh.position_ids is not None:
        return g.op("RotaryEmbedding", x, sh.cos, sh.sin, sh.position_ids)
    x1, x2 = g.op("Split", x, axis=-1, num_outputs=2, outputs=2)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, sh.cos), g.op("Mul", rotated, sh.sin))


@dataclass(frozen=True)
class _Shared:
    """Values every layer reuses: rotary cos/sin of the new positions (or, for RotaryEmbedding, the tables and the
    positions), the attention masks and, for an in-place KV cache, where the new keys/values go; for the pool
    layout, the new K/V rows each layer adds (collected into `new_kv`)."""

    cos: str
    sin: str
    position_ids: str | None  # int64 [B, T] for RotaryEmbedding (opset >= 23); None: cos/sin are gathered rows
    masks: dict  # window (None = global) -> bool [group*T, S] ([B, 1, group*T, S] per row in the pool layout)
    scatter_idx: str | None  # int64 [B, kv_heads, T, 3]: (batch, kv head, position) of each new row, for ScatterND
    kv_cache: str = "concat"
    new_rows: list = field(default_factory=list)
    pool_rows: str | None = None  # int64 [B, kv_heads, past_bucket]: the pool rows a pool-layout step gathers
    pool_parts: str | None = None  # int64 [2]: past_bucket and T (a pool-layout score row's past and new parts)


def _positions(g: Graph, cfg: CheckpointConfig, kv_cache: str) -> tuple[str, str, str | None]:
    """(query positions [T], key positions [S], scatter indices or None). "concat": the past length is the past
    tensor's; "inplace": it is the `past_length` input and the keys are the whole buffer (unwritten slots lie in
    the future of every query, so the causal mask hides them)."""
    new = g.op("Shape", "input_ids", start=1, end=2)
    past = g.op("Shape", "past_key_values.0.key", start=2, end=3) if kv_cache == "concat" else "past_length"
    axis0 = g.const([0], np.int64)
    start, stop = g.op("Squeeze", past, axis0), g.op("Squeeze", g.op("Add", past, new), axis0)  # Range: scalars
    q_pos = g.op("Range", start, stop, g.const(1, np.int64))
    if kv_cache == "concat":
        return q_pos, g.op("Range", g.const(0, np.int64), stop, g.const(1, np.int64)), None
    capacity = g.op("Squeeze", g.op("Shape", "past_key_values.0.key", start=2, end=3), axis0)
    k_pos = g.op("Range", g.const(0, np.int64), capacity, g.const(1, np.int64))
    # ScatterND indices (batch, kv head, position) per new row: it copies whole head_size rows, where ScatterElements
    # walks every element with its own index (measured 2.7 vs 15 us per layer-sized write on onnxruntime's CPU EP)
    batch = g.op("Shape", "input_ids", start=0, end=1)
    shape = g.op("Concat", batch, g.const([cfg.num_key_value_heads], np.int64), new, g.const([1], np.int64), axis=0)
    b_idx = g.op("Reshape", g.op("Range", g.const(0, np.int64), g.op("Squeeze", batch, axis0), g.const(1, np.int64)),
                 g.const([-1, 1, 1, 1], np.int64))
    h_idx = g.const(np.arange(cfg.num_key_value_heads).reshape(1, -1, 1, 1), np.int64)
    t_idx = g.op("Reshape", q_pos, g.const([1, 1, -1, 1], np.int64))
    idx = g.op("Concat", *(g.op("Expand", part, shape) for part in (b_idx, h_idx, t_idx)), axis=-1)
    return q_pos, k_pos, idx


def _shared(g: Graph, cfg: CheckpointConfig, max_seq_len: int, kv_cache: str) -> _Shared:
    if kv_cache == "pool":  # per-row positions [B, T] and masks [B, 1, group*T, S]
        q_pos, offsets, k_past, rows, parts = pool.positions(g, cfg)
        cos, sin, position_ids = _rope_tables(g, cfg, max_seq_len, q_pos, per_row=True)
        return _Shared(cos, sin, position_ids, pool.masks(g, cfg, q_pos, offsets, k_past), None, kv_cache,
                       pool_rows=rows, pool_parts=parts)
    q_pos, k_pos, scatter_idx = _positions(g, cfg, kv_cache)
    cos, sin, position_ids = _rope_tables(g, cfg, max_seq_len, q_pos, per_row=False)
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
    return _Shared(cos, sin, position_ids, masks, scatter_idx, kv_cache)


def _rope_tables(g: Graph, cfg: CheckpointConfig, max_seq_len: int, q_pos: str, per_row: bool):
    """(cos, sin, position_ids or None) for query positions `q_pos` ([T], or [B, T] per row)."""
    # float32 tables as the reference computes them (positions x inv_freq in float32, then cos/sin)
    freqs = np.arange(max_seq_len, dtype=np.float32)[:, None] * rope_inv_freq(cfg.head_size, cfg.rotary_base)[None]
    if g.opset >= FUSED_OPSET:  # RotaryEmbedding: half tables [max_seq_len, d/2] and positions [B, T]
        cos, sin = g.ftensor("rope.cos", np.cos(freqs)), g.ftensor("rope.sin", np.sin(freqs))
        if per_row:
            return cos, sin, q_pos
        return cos, sin, g.op("Expand", g.op("Unsqueeze", q_pos, g.const([0], np.int64)), g.op("Shape", "input_ids"))
    emb = np.concatenate([freqs, freqs], -1)  # [max_seq_len, d]: gathered rows broadcast over [B, heads, T, d]
    cos = g.op("Gather", g.ftensor("rope.cos", np.cos(emb).astype(np.float32)), q_pos, axis=0)
    sin = g.op("Gather", g.ftensor("rope.sin", np.sin(emb).astype(np.float32)), q_pos, axis=0)
    if per_row:  # [B, T, d] -> [B, 1, T, d]: one row of tables per sequence, broadcast over heads
        cos, sin = (g.op("Unsqueeze", t, g.const([1], np.int64)) for t in (cos, sin))
    return cos, sin, None


def _attention(ctx: Ctx, i: int, x: str, sh: _Shared) -> str:
    g, c = ctx.g, ctx.cfg
    p = f"transformer.layers.{i}.attention"
    d, nq, nkv = c.head_size, c.num_attention_heads, c.num_key_value_heads
    # one Transpose of the fused q/k/v to heads-first [B, heads, T, d], then split: q, k and v come out in the
    # layout attention and the KV cache want (three Transposes fewer per layer)
    qkv = g.op("Reshape", linear(ctx, f"{p}.qkv", x), g.const([0, 0, nq + 2 * nkv, d], np.int64))
    qkv = g.op("Transpose", qkv, perm=[0, 2, 1, 3])
    qk, v = g.op("Split", qkv, g.const([nq + nkv, nkv], np.int64), axis=1, outputs=2)
    q, k = g.op("Split", rope(g, qk, sh), g.const([nq, nkv], np.int64), axis=1, outputs=2)
    if c.kv_cache_quant_algo == "FP8":
        from trt_gemma.reference.quantized import FP8Quant, _scalar

        kvq = FP8Quant.from_scaling_factor(_scalar(ctx.shards, f"{p}.kv_cache_scaling_factor"))
        k, v = fp8_qdq(g, k, float(kvq.scale), f"{p}.k_cache"), fp8_qdq(g, v, float(kvq.scale), f"{p}.v_cache")
    if sh.kv_cache == "pool":  # the step's past rows gathered from the bound pool; the new rows go out
        k_past, v_past = pool.gather_kv(g, c, i, k, v, sh.pool_rows, sh.new_rows)
    elif sh.scatter_idx is None:  # present = past ++ new
        k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, name=f"present.{i}.key")
        v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, name=f"present.{i}.value")
    else:  # the new rows written into the buffer (in place where the runtime binds present to past)
        k = g.op("ScatterND", f"past_key_values.{i}.key", sh.scatter_idx, k, name=f"present.{i}.key")
        v = g.op("ScatterND", f"past_key_values.{i}.value", sh.scatter_idx, v, name=f"present.{i}.value")
    if sh.kv_cache != "pool":
        length = "total_sequence" if sh.scatter_idx is None else "capacity"
        g.output(k, f"present.{i}.key", g.act, ["batch", nkv, length, d])
        g.output(v, f"present.{i}.value", g.act, ["batch", nkv, length, d])
    # GQA: query head h uses kv head h // group; grouping the query heads under their kv head lets one batched
    # MatMul per kv head cover them ([B, kv, group*T, d] x [B, kv, d, S]).
    qg = g.op("Reshape", q, g.const([0, nkv, -1, d], np.int64))
    pooled = sh.kv_cache == "pool"  # past and new attended apart: their K and V are never concatenated
    scores = pool.scores(g, qg, k_past, k) if pooled else g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    scale = float(attention_scale(c.query_pre_attn_scalar))
    cap = c.attn_logit_softcapping
    if cap is None:
        scores = g.op("Mul", scores, g.fconst(scale))
    else:  # tanh(scores * scale / cap) * cap: the scale folded into the soft-cap's division
        scores = g.op("Mul", g.op("Tanh", g.op("Mul", scores, g.fconst(scale / cap))), g.fconst(cap))
    window = c.sliding_window if c.is_sliding(i) else None
    scores = g.op("Where", sh.masks[window], scores, g.fconst(-np.inf))
    probs = g.op("Softmax", scores, axis=-1)  # then [B, kv, group*T, d]:
    out = pool.weighted_values(g, probs, v_past, v, sh.pool_parts) if pooled else g.op("MatMul", probs, v)
    out = g.op("Transpose", g.op("Reshape", out, g.const([0, nq, -1, d], np.int64)), perm=[0, 2, 1, 3])
    z = g.op("Reshape", out, g.const([0, 0, nq * d], np.int64), name=f"{p}.z")  # named: a site (onnx/sites.py)
    return linear(ctx, f"{p}.dense", z)


def _block(ctx: Ctx, i: int, x: str, sh: _Shared) -> str:
    """input_layernorm -> attention -> post_layernorm -> +x -> pre_feedforward_layernorm -> GeGLU ->
    post_feedforward_layernorm -> +x (reference `ReferenceModel._block`)."""
    g, eps, p = ctx.g, ctx.cfg.norm_epsilon, f"transformer.layers.{i}"

    def norm(t: str, n: str) -> str:
        return rms_norm(g, t, g.tensor(f"{p}.{n}.weight", ctx.shards.get_f32(f"{p}.{n}.weight")), eps, f"{p}.{n}")

    h = _attention(ctx, i, norm(x, "input_layernorm"), sh)
    x = g.op("Add", x, norm(h, "post_layernorm"), name=f"{p}.attention_residual")
    h = norm(x, "pre_feedforward_layernorm")
    act = gelu_tanh(g, linear(ctx, f"{p}.mlp.fc", h))  # fc <- HF gate_proj (activated), gate <- HF up_proj
    h = linear(ctx, f"{p}.mlp.proj", g.op("Mul", act, linear(ctx, f"{p}.mlp.gate", h)))
    return g.op("Add", x, norm(h, "post_feedforward_layernorm"), name=f"{p}.mlp_residual")


# ---- the stage ----------------------------------------------------------------------------------------------------

def check_options(cfg: CheckpointConfig, where: str, opset: int, lm_head: str, max_seq_len: int | None,
                  kv_cache: str = "concat", logits: str = "last", activations: str = "float32") -> int:
    """Refuse what the graph cannot represent before any work; returns the max_seq_len to use."""
    import onnx

    for flag, value in (("--activations", activations), ("--logits", logits), ("--kv-cache", kv_cache),
                        ("--lm-head", lm_head)):
        allowed, fix = CHOICE_OPTIONS[flag]
        if value not in allowed:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(allowed)}", fix=fix)
    if cfg.quant_algo not in LINEAR_EXPORTS:
        raise UnsupportedModelError(f"{where}: quant_algo {cfg.quant_algo!r} cannot be exported to ONNX (supported: "
                                    f"{', '.join(str(k) for k in LINEAR_EXPORTS)})",
                                    fix="export an unquantized, INT8/INT4 weight-only, INT4-AWQ or FP8 checkpoint")
    if cfg.kv_cache_quant_algo not in KV_CACHE_EXPORTS:
        raise UnsupportedModelError(f"{where}: kv_cache_quant_algo {cfg.kv_cache_quant_algo!r} cannot be exported "
                                    "(supported: float, FP8)", fix="quantize with a float or FP8 KV cache")
    newest = onnx.defs.onnx_opset_version()
    int4 = cfg.quant_algo in ("W4A16_AWQ", "W4A16") or lm_head == "int4"
    need, why = (MIN_OPSET, "INT4 / blocked DequantizeLinear") if int4 else (20, "Gelu(approximate='tanh')")
    if opset < need or opset > newest:
        raise ConfigError(f"--opset {opset}: this graph needs opset >= {need} ({why}) and the installed onnx "
                          f"knows up to {newest}", fix=f"use --opset {max(MIN_OPSET, need)}")
    limit = cfg.max_position_embeddings
    n = limit if max_seq_len is None else max_seq_len
    if not 1 <= n <= limit:
        raise ConfigError(f"--max-seq-len {n} is outside 1..{limit} (max_position_embeddings)",
                          fix=f"use --max-seq-len <= {limit}")
    return n


def check_pool_options(kv_cache: str, logits: str, top_k: int, vocab_mask: bool) -> None:
    if kv_cache != "pool":
        if vocab_mask:
            raise ConfigError(f"--vocab-mask is an input of the pool layout (--kv-cache {kv_cache} was asked for)",
                              fix="add --kv-cache pool, or drop --vocab-mask")
        return
    if logits != "last":
        raise ConfigError("--kv-cache pool returns the last position of each row (logits, ArgMax, TopK), not "
                          f"--logits {logits}", fix="use --logits last with --kv-cache pool, or --kv-cache concat")
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"--top-k {top_k}: the pool layout returns at least one candidate per row",
                          fix=f"use --top-k {pool.DEFAULT_TOP_K}")


def export_onnx(checkpoint: str | Path, out: str | Path, max_seq_len: int | None = None, opset: int = MIN_OPSET,
                lm_head: str = "none", kv_cache: str = "concat", logits: str = "last",
                activations: str = "float32", force: bool = False, show_progress: bool = True,
                site_outputs=(), top_k: int = pool.DEFAULT_TOP_K, vocab_mask: bool = False) -> dict:
    """Write OUT/model.onnx (+ model.onnx.data, the tokenizer, trt_gemma_onnx.json) from a TensorRT-LLM
    checkpoint dir; returns the summary that trt_gemma_onnx.json holds. OUT appears complete or not at all.
    `site_outputs`: (tap, layer) pairs added as float32 outputs `site.L.tap` (onnx/sites.py). `top_k` (candidates
    returned per row) and `vocab_mask` (a per-row allowed-token input) shape the pool layout's generation outputs."""
    from trt_gemma.console import progress
    from trt_gemma.fsutil import atomic_output_dir, check_output_target
    from trt_gemma.reference.checkpoint import check_all_used

    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # the CLI checks too; callers of the function get the same error
        raise DependencyError("export-onnx needs the onnx package", fix="pip install 'trt-gemma[onnx]'")
    t0 = time.time()
    ckpt, out = Path(checkpoint), Path(out)
    cfg = CheckpointConfig.from_file(ckpt / "config.json")
    max_seq_len = check_options(cfg, str(ckpt / "config.json"), opset, lm_head, max_seq_len, kv_cache, logits,
                                activations)
    site_outputs = parse_site_outputs(site_outputs, cfg.num_hidden_layers)
    check_pool_options(kv_cache, logits, top_k, vocab_mask)
    heads = (top_k, vocab_mask) if kv_cache == "pool" else None
    check_output_target(out, force)
    shards = ShardSet(ckpt, cfg)
    with atomic_output_dir(out, force) as tmp:
        g = Graph(tmp / f"{MODEL_FILE}.data", ACTIVATION_TYPES[activations], opset)
        try:
            with progress(disable=not show_progress) as bar:
                _build(Ctx(g, shards, cfg), lm_head, max_seq_len, kv_cache, logits, bar, heads)
                add_site_outputs(g, cfg, site_outputs)  # graph outputs: the summary lists them with the rest
            check_all_used(shards)
        finally:
            g.close_data()
        summary = _summary(ckpt, cfg, max_seq_len, lm_head, kv_cache, logits, g)
        if heads is not None:
            summary["model"].update(top_k=min(top_k, cfg.vocab_size), vocab_mask=vocab_mask, contract=pool.CONTRACT)
        model = g.model("gemma2", f"Gemma 2 exported by trt_gemma from {ckpt.name}",
                        {"trt_gemma": json.dumps(summary["model"])})
        _save(model, tmp / MODEL_FILE)
        _copy_tokenizer(ckpt, tmp)
        copy_in(ckpt, "config.json", tmp / "checkpoint_config.json")
        summary.update(wall_s=round(time.time() - t0, 3), peak_rss_bytes=peak_rss_bytes())
        (tmp / MANIFEST).write_text(json.dumps(summary, indent=2))
    summary["path"] = str(out)
    return summary


def _build(ctx: Ctx, lm_head: str, max_seq_len: int, kv_cache: str, logits: str, bar,
           heads: tuple[int, bool] | None = None) -> None:
    """The whole graph: embedding (x sqrt(hidden)), the decoder blocks, final norm, lm_head, soft-cap. With
    logits="last" the hidden state is sliced to the last position before the final norm, so the norm and the lm_head
    MatMul run on one row per sequence (Slice, not Gather with -1: every ONNX parser takes negative Slice starts).
    `heads` (pool layout): (top_k, vocab_mask) of the generation outputs (onnx/pool.py)."""
    g, cfg = ctx.g, ctx.cfg
    task = bar.add_task("exporting", total=cfg.num_hidden_layers + 2)
    if kv_cache == "pool":
        pool.declare_io(g, cfg, heads[1])
    else:
        _declare_io(g, cfg, kv_cache)
    gather, head = embedding_and_head(ctx, lm_head)
    normalizer = g.fconst(float(embedding_normalizer(cfg.hidden_size, cfg.dtype)))
    x = g.op("Mul", gather("input_ids"), normalizer, name="embed_scale")
    bar.advance(task)
    sh = _shared(g, cfg, max_seq_len, kv_cache)
    for i in range(cfg.num_hidden_layers):
        bar.update(task, description=f"layer {i}")
        x = _block(ctx, i, x, sh)
        bar.advance(task)
    if logits == "last":
        x = g.op("Slice", x, g.const([-1], np.int64), g.const([np.iinfo(np.int64).max], np.int64),
                 g.const([1], np.int64), name="last_position")
    ln_f = g.tensor("transformer.ln_f.weight", ctx.shards.get_f32("transformer.ln_f.weight"))
    out = head(rms_norm(g, x, ln_f, cfg.norm_epsilon, "ln_f"))
    out = out if g.act == "FLOAT" else g.op("Cast", out, to=onnx_type("FLOAT"))  # float32 logits in every variant
    out = soft_cap(g, out, cfg.final_logit_softcapping)
    if kv_cache == "pool":
        pool.outputs(g, cfg, out, sh.new_rows, *heads)
        bar.update(task, description="exported", completed=cfg.num_hidden_layers + 2)
        return
    g.output(out, "logits", "FLOAT", ["batch", 1 if logits == "last" else "sequence", cfg.vocab_size])
    g.outputs.sort(key=lambda v: v.name != "logits")  # logits first, then present.{i}.key/value
    bar.update(task, description="exported", completed=cfg.num_hidden_layers + 2)


def _declare_io(g: Graph, cfg: CheckpointConfig, kv_cache: str) -> None:
    g.input("input_ids", "INT64", ["batch", "sequence"])
    if kv_cache == "inplace":
        g.input("past_length", "INT64", [1])
    length = "past_sequence" if kv_cache == "concat" else "capacity"
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            g.input(f"past_key_values.{i}.{kv}", g.act, ["batch", cfg.num_key_value_heads, length, cfg.head_size])


def _summary(ckpt: Path, cfg: CheckpointConfig, max_seq_len: int, lm_head: str, kv_cache: str, logits: str,
             g: Graph) -> dict:
    from trt_gemma import __version__

    model = {"num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
             "head_size": cfg.head_size, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
             "max_seq_len": max_seq_len, "dtype": cfg.dtype,
             "activation_dtype": {v: k for k, v in ACTIVATION_TYPES.items()}[g.act],
             "quant_algo": cfg.quant_algo, "kv_cache_quant_algo": cfg.kv_cache_quant_algo, "lm_head": lm_head,
             "kv_cache": kv_cache, "logits": logits,
             "sliding_window": cfg.sliding_window,
             "layer_types": [t if cfg.is_sliding(i) else FULL for i, t in enumerate(cfg.layer_types)]}
    io = pool.io_specs(g)
    return {"format": "trt_gemma-onnx/1", "producer": f"trt_gemma {__version__}", "source": str(ckpt),
            "opset": g.opset, "model_file": MODEL_FILE, "data_file": g.data_path.name, "model": model,
            "nodes": len(g.nodes), "initializers": len(g.initializers), "external_bytes": g.external_bytes,
            "inputs": [t["name"] for t in io if t["is_input"]], "outputs": [t["name"] for t in io if not t["is_input"]],
            "io": io}


def _save(model, path: Path) -> None:
    """Serialize the (weight-free) proto, then let onnx's checker validate it against the external data."""
    import onnx
    from onnx import helper

    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))


def _copy_tokenizer(ckpt: Path, dst: Path) -> None:
    from trt_gemma.checkpoint.hf import TOKENIZER_FILES

    for name in (*TOKENIZER_FILES, "generation_config.json"):  # generation_config: the stop tokens
        if (ckpt / name).is_file():
            copy_in(ckpt, name, dst / name)  # content checked under the checkpoint, never a link out


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


# What readers take from an export's manifest, checked on read: field -> accepted types (model: its "model" block).
MANIFEST_FIELDS = {"model_file": str, "data_file": str, "external_bytes": int, "inputs": list, "outputs": list,
                   "model": dict}
MANIFEST_MODEL_FIELDS = {"max_seq_len": int, "vocab_size": int, "num_hidden_layers": int, "num_key_value_heads": int,
                         "head_size": int, "dtype": str, "quant_algo": (str, type(None))}


def read_manifest(onnx_dir: Path) -> dict:
    """An export's manifest, checked: the dir passes safe_io.check_tree, the JSON its caps, every field readers use
    has its type, and model_file / data_file are regular files inside the export (never `../other/model.onnx`)."""
    onnx_dir = Path(onnx_dir)
    fix = "export it again with `trt-gemma export-onnx CHECKPOINT OUT`"
    check_tree(onnx_dir, fix=fix)
    path = onnx_dir / MANIFEST
    if not path.is_file():
        raise InputError(f"{onnx_dir} has no {MANIFEST}: not an export of `trt-gemma export-onnx`", fix=fix)
    man = read_json_object(path, fix=fix)
    for block, fields in ((man, MANIFEST_FIELDS), (man.get("model"), MANIFEST_MODEL_FIELDS)):
        for name, kind in fields.items():
            value = block.get(name) if isinstance(block, dict) else None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InputError(f"{path}: field {name!r} is {value!r}, expected {getattr(kind, '__name__', 'str')}",
                                 fix=fix)
    if not all(isinstance(n, str) for n in man["inputs"] + man["outputs"]):
        raise InputError(f"{path}: inputs and outputs must be lists of tensor names", fix=fix)
    for name in ("model_file", "data_file"):
        if not resolve_in(onnx_dir, man[name], fix, source=path).is_file():
            raise InputError(f"{path}: {name} {man[name]!r} is not a file in {onnx_dir}", fix=fix)
    _check_external_data(onnx_dir, onnx_dir / man["model_file"], fix)
    return man


def _check_external_data(onnx_dir: Path, model_path: Path, fix: str) -> None:
    """Every weight file the graph names (its initializers' external_data locations) lies inside the export; the
    graph is read without its weights (KBs to MBs). onnxruntime refuses a location that escapes, but untyped."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # nothing to check with: onnxruntime's own check remains
        return
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise InputError(f"{model_path} is not a readable ONNX model ({e})", fix=fix) from None
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                resolve_in(onnx_dir, entry.value, fix, source=model_path)
