"""The "pool" KV layout: batched steps over a KV pool the runtime owns (`export-onnx --kv-cache pool`).

A step runs `input_ids` [batch, T] for `batch` sequences that each have their own past length (`past_lengths`
[batch]) and live in their own slot of the pool (`slot_ids` [batch]). Per layer the pool holds K and V as
`[slots, kv_heads, capacity, head_dim]` blocks, bound as they are (`past_key_values.{i}.key/value`: the same address
and shape every step, nothing copied). `past_positions` [past_bucket] (0 .. bucket - 1, the longest active row
rounded up to a bucket) says which positions the step reads: the graph gathers head_dim rows
`(slot * kv_heads + head) * capacity + position` straight into attention's [batch, kv_heads, past_bucket, head_dim]
(no Transpose), so it reads `batch x kv_heads x past_bucket` rows, each (sequence, head) one contiguous run: a lone
sequence reads dense blocks, where a sequence-major pool would stride over every slot. It masks per row (a key is visible
when it was written, is not in the future, and, on sliding layers, is inside the window) and attends over
past ++ new without concatenating them: the scores over the gathered past and over the new rows are computed apart
and concatenated (they are small), one softmax covers both, and the values are the sum of the two parts' products.

Nothing is written in place: the graph returns the new rows only, `new_kv` [2 * layers, batch, kv_heads, T, head_dim]
(layer-major, key then value; for T = 1 each sequence's row of a layer is one dense [kv_heads, head_dim] block), and
the runtime copies them to (position, slot) in the pool. TensorRT lets an output
share its input's memory only through its KV-cache-update layer (TensorRT >= 10.15) and plugins, so a graph that
scatters into a bound-twice buffer (`--kv-cache inplace`) is not what an engine is built from.

Generation outputs come from the last position: `topk_ids` (TopK of the logits, k from the export), `topk_logprobs`
(the log-softmax over the whole vocabulary at those ids) and `next_token` (the first candidate: ArgMax's pick), so a
device runtime returns ids and candidates rather than vocabulary-wide rows; `logits` [batch, vocab] is there for a
request that samples from the whole vocabulary, fetched only then. With `vocab_mask` (bool [batch, vocab], true =
allowed) every one of them is computed from the masked logits: grammar-constrained decoding and logit bias need no
host copy of the logits.
"""
from __future__ import annotations

import numpy as np

from trt_gemma.onnx.graph import Graph, onnx_type
from trt_gemma.reference.checkpoint import CheckpointConfig

DEFAULT_TOP_K = 64
UNWRITTEN = 1 << 62  # the key position a mask gives a pool position its row has not written: after every query
NEW_KV = "new_kv"
# the I/O contract's revision: in the manifest, and in the onnxruntime backend's cache key, so a cached export made
# by an earlier contract is not bound with this one's names and shapes
CONTRACT = "pool/2"


def declare_io(g: Graph, cfg: CheckpointConfig, vocab_mask: bool) -> None:
    g.input("input_ids", "INT64", ["batch", "sequence"])
    g.input("past_lengths", "INT64", ["batch"])
    g.input("slot_ids", "INT64", ["batch"])
    if vocab_mask:
        g.input("vocab_mask", "BOOL", ["batch", cfg.vocab_size])
    g.input("past_positions", "INT64", ["past_bucket"])
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            g.input(f"past_key_values.{i}.{kv}", g.act,
                    ["slots", cfg.num_key_value_heads, "capacity", cfg.head_size])


def positions(g: Graph, cfg: CheckpointConfig) -> tuple[str, str, str, str, str]:
    """(query positions [B, T], new-token offsets [T], past key positions [Lb], the pool rows to gather
    [B, kv_heads, Lb], [Lb, T]: how a score row splits into its past and new parts)."""
    i64 = np.int64
    new = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.const([0], i64))
    offsets = g.op("Range", g.const(0, i64), new, g.const(1, i64))
    q_pos = g.op("Add", g.op("Unsqueeze", "past_lengths", g.const([1], i64)),
                 g.op("Unsqueeze", offsets, g.const([0], i64)))
    capacity = g.op("Shape", "past_key_values.0.key", start=2, end=3)  # [1]
    heads = g.const(np.arange(cfg.num_key_value_heads).reshape(1, -1, 1), i64)
    first = g.op("Add", g.op("Mul", g.op("Unsqueeze", "slot_ids", g.const([1, 2], i64)),
                             g.const(cfg.num_key_value_heads, i64)), heads)  # [B, kv, 1]: slot * kv + head
    rows = g.op("Add", g.op("Mul", first, capacity), g.op("Unsqueeze", "past_positions", g.const([0, 1], i64)))
    parts = g.op("Concat", g.op("Shape", "past_positions"), g.op("Shape", "input_ids", start=1, end=2), axis=0)
    return q_pos, offsets, "past_positions", rows, parts


def masks(g: Graph, cfg: CheckpointConfig, q_pos: str, offsets: str, k_past: str) -> dict:
    """window (None = global) -> bool [B, 1, group*T, past_bucket + T]. Every key gets a position (the bucket's,
    then the new rows' own); a bucket position the row has not written (another sequence's or nobody's) is moved
    beyond every query, so one causal test (and, on sliding layers, one window test) on query - key covers both
    parts."""
    i64 = np.int64
    k_bucket = g.op("Unsqueeze", k_past, g.const([0], i64))  # [1, Lb]
    written = g.op("Less", k_bucket, g.op("Unsqueeze", "past_lengths", g.const([1], i64)))  # [B, Lb]
    k_pos = g.op("Concat", g.op("Where", written, k_bucket, g.const(UNWRITTEN, i64)), q_pos, axis=1)  # [B, S]
    d = g.op("Sub", g.op("Unsqueeze", q_pos, g.const([2], i64)),
             g.op("Unsqueeze", k_pos, g.const([1], i64)))  # [B, T, S]: query pos - key pos
    causal = g.op("GreaterOrEqual", d, g.const(0, i64))
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    windows = {cfg.sliding_window if cfg.is_sliding(i) else None for i in range(cfg.num_hidden_layers)}
    out = {}
    for w in windows:
        m = causal if w is None else g.op("And", causal, g.op("Less", d, g.const(w, i64)))
        out[w] = g.op("Unsqueeze", g.op("Tile", m, g.const([1, group, 1], i64)), g.const([1], i64))
    return out


def gather_kv(g: Graph, cfg: CheckpointConfig, i: int, k: str, v: str, rows: str,
              new_rows: list[str]) -> tuple[str, str]:
    """The step's past rows [B, kv, past_bucket, d] of layer i, gathered from the bound blocks (viewed as
    [slots * kv * capacity, d]) straight into attention's layout. The new rows k, v [B, kv, T, d] are kept for
    `new_kv` as they are; they are not appended to the past (see `attend`)."""
    flat = g.const([-1, cfg.head_size], np.int64)
    past = [g.op("Gather", g.op("Reshape", f"past_key_values.{i}.{name}", flat), rows, axis=0)
            for name in ("key", "value")]
    new_rows += [k, v]
    return past[0], past[1]


def scores(g: Graph, qg: str, k_past: str, k_new: str) -> str:
    """q [B, kv, group*T, d] against past ++ new keys -> [B, kv, group*T, past_bucket + T]: two MatMuls whose
    small score tensors are concatenated, instead of one MatMul over a concatenation of the keys (a copy of the
    whole gathered past per layer, and again for the values)."""
    return g.op("Concat", g.op("MatMul", qg, g.op("Transpose", k_past, perm=[0, 1, 3, 2])),
                g.op("MatMul", qg, g.op("Transpose", k_new, perm=[0, 1, 3, 2])), axis=-1)


def weighted_values(g: Graph, probs: str, v_past: str, v_new: str, parts: str) -> str:
    """probs [B, kv, group*T, past_bucket + T] x (past ++ new values) as the sum of its past and new parts
    (`parts`: int64 [2], past_bucket and T)."""
    p_past, p_new = g.op("Split", probs, parts, axis=-1, outputs=2)
    return g.op("Add", g.op("MatMul", p_past, v_past), g.op("MatMul", p_new, v_new))


def outputs(g: Graph, cfg: CheckpointConfig, logits: str, new_rows: list[str], top_k: int, vocab_mask: bool) -> None:
    """`logits` float32 [B, 1, vocab] of the last position -> the generation outputs, then `new_kv`."""
    i64 = np.int64
    if vocab_mask:
        x = g.op("Where", "vocab_mask", g.op("Reshape", logits, g.const([0, cfg.vocab_size], i64)), g.const(-np.inf),
                 outputs=["logits"])
    else:
        x = g.op("Reshape", logits, g.const([0, cfg.vocab_size], i64), outputs=["logits"])
    g.output(x, "logits", "FLOAT", ["batch", cfg.vocab_size])
    k = min(top_k, cfg.vocab_size)
    # TopK of the logits (largest first, ties to the lower id: ArgMax's pick) and the log-softmax at its ids (what
    # `logprobs` reports; a sampler at any temperature reads them as logits: softmax does not see the per-row
    # shift); the greedy id is the first candidate, so no separate ArgMax pass over the vocabulary
    g.op("TopK", x, g.const([k], i64), axis=-1, outputs=["topk_logits", "topk_ids"])
    g.op("GatherElements", g.op("LogSoftmax", x, axis=-1), "topk_ids", axis=-1, outputs=["topk_logprobs"])
    first = g.op("Slice", "topk_ids", g.const([0], i64), g.const([1], i64), g.const([1], i64))
    g.op("Squeeze", first, g.const([1], i64), outputs=["next_token"])
    g.output("next_token", "next_token", "INT64", ["batch"])
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
