"""The KV pool and the binding plan of a pool-layout graph (onnx/pool.py), over any `Executor`.

Memory: one executor buffer holds every layer's K and V as blocks `[slots, kv_heads, capacity, head_dim]`
(block j = layer j // 2, key for even j, value for odd), each bound whole as its `past_key_values.*` input (same
address and shape every step); `past_positions` (a view of 0 .. capacity - 1 in staging, `bucket` long) tells the
graph how many positions to gather. A second buffer (staging) holds a step's inputs and outputs; the views of one
step shape (bucket, batch, new tokens) are made once and kept, so a decode step binds the same mapping object again
(an executor may cache its binding on it).

Positions a step may read are zeroed the first time a bucket reaches them (`cudaMallocAsync` memory is not): the
graph masks unwritten keys, but a masked NaN would still reach the output through probabilities x values.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from trt_gemma.runtime.executor import Buffer, Executor, View

ALIGN = 256  # bytes: where each staging tensor starts (CUDA's allocation alignment)
PLAN_CACHE = 256  # step shapes whose views are kept (decode shapes repeat; prefill chunk lengths vary)


@dataclass(frozen=True)
class PoolShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # numpy name of the KV (the graph's activation dtype)
    capacity: int  # positions per slot
    slots: int

    @cached_property
    def row_bytes(self) -> int:  # one position of one slot in one block
        return self.kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    @cached_property
    def head_pitch(self) -> int:  # one (slot, head) run of capacity head_dim rows
        return self.capacity * self.row_bytes // self.kv_heads

    @cached_property
    def slot_pitch(self) -> int:
        return self.capacity * self.row_bytes

    @cached_property
    def block_bytes(self) -> int:
        return self.slots * self.slot_pitch

    @cached_property
    def nbytes(self) -> int:
        return 2 * self.layers * self.block_bytes

    @cached_property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.row_bytes


class KVPool:
    """Slots of a fixed-capacity pool in executor memory; `write_rows` lands a step's `new_kv` at the rows'
    positions with one strided copy per row (decode) or per block (a prefill chunk)."""

    def __init__(self, ex: Executor, shape: PoolShape):
        self.ex, self.shape = ex, shape
        self.buffer: Buffer = ex.alloc(shape.nbytes, kind="kv_cache")
        self.zeroed = 0  # positions [0, zeroed) of every slot hold zeros or written rows
        self.free = list(range(shape.slots - 1, -1, -1))

    def take(self) -> int:
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        assert slot not in self.free
        self.free.append(slot)

    def block(self, j: int) -> View:
        s = self.shape
        return View(self.buffer, j * s.block_bytes, (s.slots, s.kv_heads, s.capacity, s.head_dim), s.dtype)

    def ensure_zeroed(self, upto: int) -> None:
        s = self.shape
        if upto <= self.zeroed:
            return
        zeros = np.zeros((upto - self.zeroed, s.head_dim), s.dtype)
        hb = s.row_bytes // s.kv_heads
        for j in range(2 * s.layers):
            for run in range(s.slots * s.kv_heads):
                at = j * s.block_bytes + run * s.head_pitch + self.zeroed * hb
                self.ex.upload(View(self.buffer, at, zeros.shape, s.dtype), zeros)
        self.zeroed = upto

    def write_rows(self, new_kv: View, rows: list[tuple[int, int]]) -> None:
        """`new_kv` [2L, B, kv, T, d] -> the pool: rows[b] = (slot, first position) of batch row b. A decode step
        (T = 1) is one strided copy per row and head down all blocks; a prefill chunk one per block (its heads'
        runs of T rows)."""
        s = self.shape
        blocks, batch, heads, new, dim = new_kv.shape
        hb = s.row_bytes // heads
        for b, (slot, pos) in enumerate(rows):
            dst = slot * s.slot_pitch + pos * hb
            src = new_kv.offset + b * heads * new * hb
            if new == 1:
                for h in range(heads):
                    self.ex.copy2d(self.buffer, dst + h * s.head_pitch, s.block_bytes, new_kv.buffer,
                                   src + h * hb, batch * heads * hb, hb, blocks)
                continue
            for j in range(blocks):
                self.ex.copy2d(self.buffer, j * s.block_bytes + dst, s.head_pitch, new_kv.buffer,
                               src + j * batch * heads * new * hb, new * hb, new * hb, heads)


@dataclass
class StepViews:
    """One step shape's bindings and the staging views the backend fills and reads."""

    bindings: dict  # graph name -> View (the pool blocks included)
    header: View  # int64 [B*T + 2B]: input_ids, past_lengths, slot_ids back to back
    ids_out: View  # int64 [B + B*K]: next_token, then topk_ids
    topk_logprobs: View
    logits: View
    new_kv: View


class Staging:
    """The step's inputs and outputs in one executor buffer, laid out for the largest step (a full decode batch or a
    full prefill chunk), and one StepViews per (bucket, batch, new tokens)."""

    def __init__(self, ex: Executor, pool: KVPool, vocab: int, top_k: int, max_tokens: int, vocab_mask: bool):
        self.ex, self.pool, self.vocab, self.top_k, self.has_mask = ex, pool, vocab, top_k, vocab_mask
        s = pool.shape
        self.max_tokens = max_tokens  # batch x new tokens of the largest step
        i64, rows = 8, s.slots  # outputs are per row (the last position): at most one per slot, not per token
        self.sizes = {"header": 3 * max_tokens * i64, "positions": s.capacity * i64, "ids_out": rows * (1 + top_k) * i64,
                      "topk_logprobs": rows * top_k * 4,
                      "logits": rows * vocab * 4, "new_kv": 2 * s.layers * max_tokens * s.row_bytes,
                      "vocab_mask": rows * vocab if vocab_mask else 0}
        self.offsets, total = {}, 0
        for name, n in self.sizes.items():
            self.offsets[name] = total
            total += -(-n // ALIGN) * ALIGN
        self.buffer = ex.alloc(total, kind="activations")
        ex.upload(View(self.buffer, self.offsets["positions"], (s.capacity,), "int64"), np.arange(s.capacity))
        if vocab_mask:  # every token allowed: the mask input is there for callers that constrain decoding
            ex.upload(View(self.buffer, self.offsets["vocab_mask"], (rows, vocab), "bool"), np.ones((rows, vocab), bool))
        self._plans: dict[tuple[int, int, int], StepViews] = {}

    def views(self, bucket: int, batch: int, new: int) -> StepViews:
        key = (bucket, batch, new)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= PLAN_CACHE:  # prefill lengths vary: keep the memory bounded
                self._plans.clear()
            plan = self._plans[key] = self._make(bucket, batch, new)
        return plan

    def _make(self, bucket: int, batch: int, new: int) -> StepViews:
        assert batch * new <= self.max_tokens and batch <= self.pool.shape.slots, \
            f"step {batch}x{new} exceeds the staging for {self.max_tokens} tokens in {self.pool.shape.slots} rows"
        s, o, buf, k = self.pool.shape, self.offsets, self.buffer, self.top_k
        header = View(buf, o["header"], (batch * new + 2 * batch,), "int64")
        ids_out = View(buf, o["ids_out"], (batch * (1 + k),), "int64")
        b = {"input_ids": View(buf, o["header"], (batch, new), "int64"),
             "past_lengths": View(buf, o["header"] + batch * new * 8, (batch,), "int64"),
             "slot_ids": View(buf, o["header"] + (batch * new + batch) * 8, (batch,), "int64"),
             "next_token": View(buf, o["ids_out"], (batch,), "int64"),
             "topk_ids": View(buf, o["ids_out"] + batch * 8, (batch, k), "int64"),
             "topk_logprobs": View(buf, o["topk_logprobs"], (batch, k), "float32"),
             "logits": View(buf, o["logits"], (batch, self.vocab), "float32"),
             "past_positions": View(buf, o["positions"], (bucket,), "int64"),
             "new_kv": View(buf, o["new_kv"], (2 * s.layers, batch, s.kv_heads, new, s.head_dim), s.dtype)}
        if self.has_mask:
            b["vocab_mask"] = View(buf, o["vocab_mask"], (batch, self.vocab), "bool")
        for i in range(s.layers):
            b[f"past_key_values.{i}.key"] = self.pool.block(2 * i)
            b[f"past_key_values.{i}.value"] = self.pool.block(2 * i + 1)
        return StepViews(b, header, ids_out, b["topk_logprobs"], b["logits"], b["new_kv"])
