"""The "pool" KV layout: batched steps over a KV pool the runtime owns (`export-onnx --kv-cache pool`).

A step runs `input_ids` [batch, T] for `batch` sequences that each have their own past length (`past_lengths`
[batch]) and live in their own slot of the pool (`slot_ids` [batch]). Per layer the pool holds K and V as
`[capacity, slots, kv_heads, head_dim]`, sequence-major, so the first L positions of every slot are one contiguous
block: the runtime binds `past_key_values.{i}.key/value` = that prefix `[past_bucket, slots, kv_heads, head_dim]`
without copying, with `past_bucket` the longest active row rounded up to a bucket. The graph gathers its rows' slots,
masks per row (a key is visible when it was written, is not in the future, and, on sliding layers, is inside the
window) and attends over past ++ new.

Nothing is written in place: the graph returns the new rows only, `new_kv` [2 * layers, batch, kv_heads, T, head_dim]
(layer-major, key then value; for T = 1 each sequence's row of a layer is one dense [kv_heads, head_dim] block), and
the runtime copies them to (position, slot) in the pool. TensorRT lets an output
share its input's memory only through its KV-cache-update layer (TensorRT >= 10.15) and plugins, so a graph that
scatters into a bound-twice buffer (`--kv-cache inplace`) is not what an engine is built from.

Generation outputs come from the last position: `next_token` (greedy ArgMax), `topk_ids` and `topk_logprobs` (TopK, k
from the export, of the log-softmax over the whole vocabulary), so a device
runtime returns ids and candidates rather than vocabulary-wide rows; `logits` [batch, vocab] is there for a request
that samples from the whole vocabulary, fetched only then. With `vocab_mask` (bool [batch, vocab], true = allowed)
every one of them is computed from the masked logits: grammar-constrained decoding and logit bias need no host copy
of the logits.
"""
from __future__ import annotations

import numpy as np

from trt_gemma.onnx.graph import Graph, onnx_type
from trt_gemma.reference.checkpoint import CheckpointConfig

DEFAULT_TOP_K = 64
NEW_KV = "new_kv"


def declare_io(g: Graph, cfg: CheckpointConfig, vocab_mask: bool) -> None:
    g.input("input_ids", "INT64", ["batch", "sequence"])
    g.input("past_lengths", "INT64", ["batch"])
    g.input("slot_ids", "INT64", ["batch"])
    if vocab_mask:
        g.input("vocab_mask", "BOOL", ["batch", cfg.vocab_size])
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            g.input(f"past_key_values.{i}.{kv}", g.act,
                    ["past_bucket", "slots", cfg.num_key_value_heads, cfg.head_size])


def positions(g: Graph) -> tuple[str, str, str]:
    """(query positions [B, T], new-token offsets [T], past key positions [Lb])."""
    i64 = np.int64
    new = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.const([0], i64))
    bucket = g.op("Squeeze", g.op("Shape", "past_key_values.0.key", start=0, end=1), g.const([0], i64))
    offsets = g.op("Range", g.const(0, i64), new, g.const(1, i64))
    q_pos = g.op("Add", g.op("Unsqueeze", "past_lengths", g.const([1], i64)),
                 g.op("Unsqueeze", offsets, g.const([0], i64)))
    return q_pos, offsets, g.op("Range", g.const(0, i64), bucket, g.const(1, i64))


def masks(g: Graph, cfg: CheckpointConfig, q_pos: str, offsets: str, k_past: str) -> dict:
    """window (None = global) -> bool [B, 1, group*T, past_bucket + T]: per row, past keys below its past length
    (the rest of the bucket is another sequence's or nobody's) and new keys up to the query, both within the
    window on sliding layers."""
    i64 = np.int64
    written = g.op("Less", g.op("Unsqueeze", k_past, g.const([0], i64)),
                   g.op("Unsqueeze", "past_lengths", g.const([1], i64)))  # [B, Lb]
    written = g.op("Unsqueeze", written, g.const([1], i64))  # [B, 1, Lb]
    d_past = g.op("Sub", g.op("Unsqueeze", q_pos, g.const([2], i64)),
                  g.op("Unsqueeze", k_past, g.const([0, 1], i64)))  # [B, T, Lb]: query pos - key pos
    d_new = g.op("Sub", g.op("Unsqueeze", offsets, g.const([1], i64)),
                 g.op("Unsqueeze", offsets, g.const([0], i64)))  # [T, T]
    causal = g.op("GreaterOrEqual", d_new, g.const(0, i64))
    batch_t = g.op("Concat", g.op("Shape", "input_ids", start=0, end=1), g.op("Shape", offsets),
                   g.op("Shape", offsets), axis=0)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    windows = {cfg.sliding_window if cfg.is_sliding(i) else None for i in range(cfg.num_hidden_layers)}
    out = {}
    for w in windows:
        past = written if w is None else g.op("And", written, g.op("Less", d_past, g.const(w, i64)))
        new = causal if w is None else g.op("And", causal, g.op("Less", d_new, g.const(w, i64)))
        past = g.op("Expand", past, g.op("Shape", d_past))
        m = g.op("Concat", past, g.op("Expand", g.op("Unsqueeze", new, g.const([0], i64)), batch_t), axis=2)
        out[w] = g.op("Unsqueeze", g.op("Tile", m, g.const([1, group, 1], i64)), g.const([1], i64))
    return out


def attend_kv(g: Graph, i: int, k: str, v: str, new_rows: list[str]) -> tuple[str, str]:
    """k, v [B, kv, T, d] (after RoPE) -> past ++ new [B, kv, past_bucket + T, d]: the rows' slots gathered from the
    bound pool prefix, moved heads-first (whole head_size rows move: a block copy, where putting the sequence axis
    last is an element-wise transpose), then the new rows. The new rows are kept for `new_kv` as they are
    ([B, kv, T, d]: for a decode step one dense [kv, d] row per sequence)."""
    out = []
    for name, x in (("key", k), ("value", v)):
        past = g.op("Gather", f"past_key_values.{i}.{name}", "slot_ids", axis=1)  # [Lb, B, kv, d]
        out.append(g.op("Concat", g.op("Transpose", past, perm=[1, 2, 0, 3]), x, axis=2))
        new_rows.append(x)
    return out[0], out[1]


def outputs(g: Graph, cfg: CheckpointConfig, logits: str, new_rows: list[str], top_k: int, vocab_mask: bool) -> None:
    """`logits` float32 [B, 1, vocab] of the last position -> the generation outputs, then `new_kv`."""
    i64 = np.int64
    if vocab_mask:
        x = g.op("Where", "vocab_mask", g.op("Reshape", logits, g.const([0, cfg.vocab_size], i64)), g.const(-np.inf),
                 outputs=["logits"])
    else:
        x = g.op("Reshape", logits, g.const([0, cfg.vocab_size], i64), outputs=["logits"])
    g.output(x, "logits", "FLOAT", ["batch", cfg.vocab_size])
    g.output(g.op("ArgMax", x, axis=-1, keepdims=0, outputs=["next_token"]), "next_token", "INT64", ["batch"])
    k = min(top_k, cfg.vocab_size)
    # TopK of the log-softmax: the same order as the logits', and the values are what `logprobs` reports; a sampler
    # at any temperature reads them as logits (softmax does not see the per-row shift)
    g.op("TopK", g.op("LogSoftmax", x, axis=-1), g.const([k], i64), axis=-1,
         outputs=["topk_logprobs", "topk_ids"])
    g.output("topk_ids", "topk_ids", "INT64", ["batch", k])
    g.output("topk_logprobs", "topk_logprobs", "FLOAT", ["batch", k])
    # [2L*B, kv, T, d] -> [2L, B, kv, T, d]: one Concat of the layers' rows and a free Reshape
    shape = g.op("Concat", g.const([2 * cfg.num_hidden_layers, -1, cfg.num_key_value_heads], i64),
                 g.op("Shape", "input_ids", start=1, end=2), g.const([cfg.head_size], i64), axis=0)
    rows = g.op("Reshape", g.op("Concat", *new_rows, axis=0), shape, outputs=[NEW_KV])
    g.output(rows, NEW_KV, g.act, [2 * cfg.num_hidden_layers, "batch", cfg.num_key_value_heads, "sequence",
                                   cfg.head_size])


def io_specs(g: Graph) -> list[dict]:
    """Every graph input and output as {name, dtype (numpy name), shape (ints and symbolic names), is_input}: what
    an executor builds its TensorSpecs from (the manifest keeps it, so no ONNX parser is needed at run time)."""
    from onnx import helper

    def spec(v, is_input: bool) -> dict:
        t = v.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "dtype": "bfloat16" if t.elem_type == onnx_type("BFLOAT16") else dtype.name,
                "shape": shape, "is_input": is_input}

    return [spec(v, True) for v in g.inputs] + [spec(v, False) for v in g.outputs]
