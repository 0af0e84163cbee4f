"""numpy Gemma 2: the CPU oracle that runs a TensorRT-LLM checkpoint in float32.

Batch size 1, one sequence, vectorized over tokens and heads (the prefill has no Python loop over tokens; attention
runs over query blocks only to bound the score matrix). Every Gemma 2 quirk is one named function below, each citing
where the behaviour comes from (transformers 5.x `models/gemma2/modeling_gemma2.py` is the oracle the tests compare
against; TensorRT-LLM `models/gemma/model.py` is what the checkpoint is built for).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from trt_gemma.checkpoint.dtypes import NAME_TO_ST, round_to
from trt_gemma.errors import ConfigError, InputError
from trt_gemma.reference.quantized import kv_cache_quantizer
from trt_gemma.reference.checkpoint import (NORMS, CheckpointConfig, Linear, LinearFormat, ShardSet,
                                            check_all_used, is_excluded, linear_format, LINEAR_FORMATS)

_ATTN_BLOCK = 256  # query rows per attention block: bounds scores to heads x 256 x keys floats
# values `activations` reads inside a block (Gemma Scope's sites, docs/scope.md): the residual after the block, the
# attention heads' outputs before o_proj, the pre-feedforward norm before its gain, the post-feedforward-normed MLP out
TAPS = ("resid_post", "attn_z", "mlp_in_normalized", "mlp_out")


def tap_width(cfg, tap: str) -> int:
    """A tap's last dimension: attn_z is heads x head_size (not hidden_size on Gemma 2), the others hidden_size."""
    return cfg.num_attention_heads * cfg.head_size if tap == "attn_z" else cfg.hidden_size


# ---- Gemma 2 quirks ------------------------------------------------------------------------------------------------

def embedding_normalizer(hidden_size: int, dtype: str) -> np.float32:
    """Embeddings are stored unscaled and multiplied by sqrt(hidden) at run time (TRT-LLM GemmaModel.forward;
    docs/tensorrt-llm-contract.md §2 "Embedding scale"). HF builds the normalizer as a float32 tensor and casts it to
    the weight dtype (`Gemma2TextScaledWordEmbedding`: `embed_scale.to(self.weight.dtype)`), so a bf16 model multiplies
    by sqrt(hidden) rounded to bf16 (9b: 59.75 instead of 59.87). We round it to the checkpoint dtype the same way;
    for float32 checkpoints that is exactly HF's float32 value."""
    return np.float32(round_to(np.array([math.sqrt(hidden_size)], np.float32), NAME_TO_ST.get(dtype, "F32"))[0])


def rms_norm(x: np.ndarray, weight_1p: np.ndarray, eps: float) -> np.ndarray:
    """Gemma RMSNorm is x_hat * (1 + w) (HF Gemma2RMSNorm, in float32); the checkpoint stores (1 + w) already
    (TRT-LLM convert.py `param + 1.0`, docs/tensorrt-llm-contract.md §3), so this is x_hat * weight."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))) * weight_1p


def attention_scale(query_pre_attn_scalar: float) -> np.float32:
    """Scores are scaled by 1/sqrt(query_pre_attn_scalar), not 1/sqrt(head_dim) (HF Gemma2Attention.scaling;
    TRT-LLM q_scaling = sqrt(qpas)/sqrt(head_size) gives the same net scale, docs/tensorrt-llm-contract.md §2)."""
    return np.float32(query_pre_attn_scalar ** -0.5)


def soft_cap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """tanh(x / cap) * cap, for attention scores (before the mask, HF eager_attention_forward) and final logits
    (HF Gemma2ForCausalLM.forward; TRT-LLM DecoderModelForCausalLM). None disables it."""
    if cap is None:
        return x
    c = np.float32(cap)
    return np.tanh(x / c) * c


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (HF `gelu_pytorch_tanh` = torch gelu(approximate='tanh'))."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


# hidden_act -> activation of the GeGLU's activated branch (TRT-LLM `mlp.fc` = HF gate_proj).
ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu_tanh": gelu_tanh, "gelu_new": gelu_tanh}


def geglu(x: np.ndarray, fc: Linear, gate: Linear, proj: Linear, act) -> np.ndarray:
    """TRT-LLM GatedMLP: proj(act(fc(x)) * gate(x)); fc <- HF gate_proj, gate <- HF up_proj (checkpoint §3)."""
    return proj(act(fc(x)) * gate(x))


def sliding_window_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """Causal mask, plus Gemma 2's sliding window on the layers layer_types marks 'sliding_attention'.
    transformers masking_utils.sliding_window_overlay: `kv_idx > q_idx - sliding_window`, i.e. query i sees key j
    iff 0 <= i - j < window (the window counts the query itself)."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def rope_inv_freq(head_size: int, base: float) -> np.ndarray:
    """RoPE frequencies as HF computes them, in float32: 1 / base ** (arange(0, d, 2) / d)."""
    exps = np.arange(0, head_size, 2, dtype=np.float32) / np.float32(head_size)
    return (np.float32(1.0) / (np.float32(base) ** exps)).astype(np.float32)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """rope_gpt_neox = HF rotate_half: the head is split in halves (not interleaved pairs). x: [T, heads, d]."""
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # float32 like HF
    cos = np.cos(np.concatenate([freqs, freqs], -1))[:, None, :]
    sin = np.sin(np.concatenate([freqs, freqs], -1))[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ---- KV cache --------------------------------------------------------------------------------------------------

class KVCache:
    """Keys/values of one sequence, float32, preallocated: k and v are [layers, kv_heads, capacity, head_size]."""

    def __init__(self, layers: int, kv_heads: int, head_size: int, capacity: int):
        self.k = np.zeros((layers, kv_heads, capacity, head_size), np.float32)
        self.v = np.zeros_like(self.k)
        self.length = 0
        self.capacity = capacity
        self._bytes_per_token = 2 * layers * kv_heads * head_size * 4

    @property
    def nbytes_used(self) -> int:
        return self.length * self._bytes_per_token

    @property
    def nbytes_capacity(self) -> int:
        return self.capacity * self._bytes_per_token


# ---- the model ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    qkv: Linear
    dense: Linear
    fc: Linear
    gate: Linear
    proj: Linear
    norms: dict  # NORMS name -> float32 [H] holding (1 + w)
    window: int | None
    kv_quant: Callable[[np.ndarray], np.ndarray] | None = None  # FP8 KV cache fake-quant (reference/quantized.py)


class ReferenceModel:
    """Gemma 2 forward in numpy float32 from a TensorRT-LLM checkpoint. Holds read-only arrays only, so threads
    may share one instance, each with its own KVCache."""

    def __init__(self, config: CheckpointConfig, embedding: np.ndarray, blocks: list[Block], ln_f: np.ndarray,
                 lm_head: Linear, weight_bytes: int):
        self.config, self.embedding, self.blocks, self.ln_f, self.lm_head = config, embedding, blocks, ln_f, lm_head
        self.weight_bytes = weight_bytes
        for a in (embedding, ln_f, *(w for b in blocks for w in b.norms.values())):
            a.flags.writeable = False  # generating threads share these
        c = config
        self.kv_bytes_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_size * 4
        self._inv_freq = rope_inv_freq(c.head_size, c.rotary_base)
        self._normalizer = embedding_normalizer(c.hidden_size, c.dtype)
        if c.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {c.hidden_act!r} is not Gemma 2's GeGLU (supported: {sorted(ACTIVATIONS)})",
                              fix="Gemma 2 uses gelu_pytorch_tanh; re-create the checkpoint")
        self._act = ACTIVATIONS[c.hidden_act]

    @classmethod
    def load(cls, ckpt_dir: str | Path) -> "ReferenceModel":
        ckpt_dir = Path(ckpt_dir)
        if not ckpt_dir.is_dir():
            raise InputError(f"checkpoint dir {ckpt_dir} does not exist",
                             fix="pass a dir made by `trt-gemma convert MODEL OUT`")
        cfg = CheckpointConfig.from_file(ckpt_dir / "config.json")
        fmt = linear_format(cfg, str(ckpt_dir / "config.json"))
        shards = ShardSet(ckpt_dir, cfg)
        V = cfg.vocab_size
        embedding = shards.get_f32("transformer.vocab_embedding.weight")[:V]  # TP pads the vocab to a multiple
        blocks = [_load_block(shards, cfg, fmt, i) for i in range(cfg.num_hidden_layers)]
        ln_f = shards.get_f32("transformer.ln_f.weight")
        head_fmt = LINEAR_FORMATS[None] if is_excluded("lm_head", cfg) else fmt
        if shards.has("lm_head.weight"):
            lm_head = head_fmt.load(shards, "lm_head")
            if lm_head.weight.shape[0] > V:  # TP pads the vocab to a multiple of tp_size
                lm_head = Linear.from_weight(lm_head.weight[:V], lm_head.act)
        else:  # TRT-LLM tolerates a missing lm_head when the embedding exists (tied, checkpoint §3)
            lm_head = Linear.from_weight(embedding)
        check_all_used(shards)
        _check_shapes(cfg, embedding, blocks, lm_head, ckpt_dir)
        return cls(cfg, embedding, blocks, ln_f, lm_head, shards.nbytes)

    def new_cache(self, capacity: int = 512) -> KVCache:
        c = self.config
        if not 1 <= capacity <= c.max_position_embeddings:
            raise InputError(f"KV cache capacity {capacity} is outside 1..max_position_embeddings "
                             f"({c.max_position_embeddings})", fix="ask for fewer prompt + generated tokens")
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_size, capacity)

    def forward(self, ids, cache: KVCache | None = None, last_only: bool = False) -> np.ndarray:
        """Logits [T, vocab] float32 for token ids of shape [T] or [1, T]; appends T positions to `cache`
        (None: a full sequence from position 0 without a cache). `last_only` returns [1, vocab] for the last token."""
        ids = np.asarray(ids)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or ids.size == 0:
            raise InputError(f"forward takes token ids of shape [T] or [1, T], got {list(np.shape(ids))}",
                             fix="pass one non-empty sequence (batch size 1)")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InputError(f"token id out of range 0..{self.config.vocab_size - 1}",
                             fix="use the checkpoint's own tokenizer")
        T = ids.size
        if cache is None:
            cache = self.new_cache(T)
        if cache.length + T > cache.capacity:
            raise InputError(f"KV cache overflow: {cache.length} cached + {T} new tokens > capacity {cache.capacity}",
                             fix="create the cache with a larger capacity (prompt + max new tokens)")
        start = cache.length
        positions = np.arange(start, start + T)
        x = self.embedding[ids] * self._normalizer
        for i, block in enumerate(self.blocks):
            x = self._block(x, block, cache, i, positions)
        cache.length = start + T
        if last_only:
            x = x[-1:]
        x = rms_norm(x, self.ln_f, self.config.norm_epsilon)
        return soft_cap(self.lm_head(x), self.config.final_logit_softcapping).astype(np.float32, copy=False)

    def residual(self, ids, layer: int) -> np.ndarray:
        """The residual stream after block `layer` for one full sequence, [T, hidden] float32: HF
        `hidden_states[layer + 1]`, SAELens `blocks.{layer}.hook_resid_post` (what Gemma Scope reads)."""
        return self.activations(ids, layer, ("resid_post",))["resid_post"]

    def activations(self, ids, layer: int, taps=TAPS) -> dict[str, np.ndarray]:
        """Values inside block `layer` for one full sequence, {tap: [T, width] float32} for the names in TAPS. Runs
        blocks 0..layer exactly as `forward` does (the block records its intermediates only when asked) and stops
        there; `forward` itself is untouched."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InputError(f"activations take a non-empty sequence of token ids in 0..{self.config.vocab_size - 1}",
                             fix="use the checkpoint's own tokenizer")
        if not 0 <= layer < len(self.blocks):
            raise InputError(f"layer {layer} is out of range: this model has blocks 0..{len(self.blocks) - 1}",
                             fix=f"pass --layer between 0 and {len(self.blocks) - 1}")
        unknown = sorted(set(taps) - set(TAPS))
        if unknown:
            raise InputError(f"no activation named {', '.join(unknown)} (known: {', '.join(TAPS)})",
                             fix="ask for taps from reference.model.TAPS")
        cache = self.new_cache(ids.size)
        seen: dict[str, np.ndarray] = {}
        x = self.embedding[ids] * self._normalizer
        for i, block in enumerate(self.blocks[:layer + 1]):
            x = self._block(x, block, cache, i, np.arange(ids.size), seen if i == layer else None)
        seen["resid_post"] = x
        return {t: seen[t] for t in taps}

    def _block(self, x, b: Block, cache: KVCache, layer: int, positions: np.ndarray,
               taps: dict | None = None) -> np.ndarray:
        """Four norms per block (TRT-LLM inter_layernorms; HF Gemma2DecoderLayer): input_layernorm -> attention ->
        post_layernorm -> +residual -> pre_feedforward_layernorm -> GeGLU -> post_feedforward_layernorm -> +residual.
        `taps`, when given, receives the values TAPS names (docs/scope.md)."""
        eps = self.config.norm_epsilon
        h = self._attention(rms_norm(x, b.norms["input_layernorm"], eps), b, cache, layer, positions, taps)
        x = x + rms_norm(h, b.norms["post_layernorm"], eps)
        if taps is not None:  # the pre-feedforward norm before its (1 + w) gain: Gemma Scope transcoders' input
            taps["mlp_in_normalized"] = rms_norm(x, np.ones(1, np.float32), eps)
        h = rms_norm(geglu(rms_norm(x, b.norms["pre_feedforward_layernorm"], eps), b.fc, b.gate, b.proj, self._act),
                     b.norms["post_feedforward_layernorm"], eps)
        if taps is not None:
            taps["mlp_out"] = h
        return x + h

    def _attention(self, x, b: Block, cache: KVCache, layer: int, positions: np.ndarray,
                   taps: dict | None = None) -> np.ndarray:
        c = self.config
        T, d, nq, nkv = x.shape[0], c.head_size, c.num_attention_heads, c.num_key_value_heads
        qkv = b.qkv(x)
        q = apply_rope(qkv[:, :nq * d].reshape(T, nq, d), positions, self._inv_freq)
        k = apply_rope(qkv[:, nq * d:(nq + nkv) * d].reshape(T, nkv, d), positions, self._inv_freq)
        v = qkv[:, (nq + nkv) * d:].reshape(T, nkv, d)
        if b.kv_quant is not None:  # a quantized KV cache stores what the quantizer returns (K after RoPE)
            k, v = b.kv_quant(k), b.kv_quant(v)
        s0 = positions[0]
        cache.k[layer, :, s0:s0 + T] = k.transpose(1, 0, 2)
        cache.v[layer, :, s0:s0 + T] = v.transpose(1, 0, 2)
        # GQA: query head h uses kv head h // group (HF repeat_kv); group the query heads under their kv head.
        group = nq // nkv
        qg = q.reshape(T, nkv, group, d).transpose(1, 2, 0, 3)  # [nkv, group, T, d]
        out = np.empty((nkv, group, T, d), np.float32)
        scale = attention_scale(c.query_pre_attn_scalar)
        for q0 in range(0, T, _ATTN_BLOCK):
            q1 = min(T, q0 + _ATTN_BLOCK)
            qpos = positions[q0:q1]
            k0 = 0 if b.window is None else max(0, int(qpos[0]) - b.window + 1)  # keys older than the window
            kpos = np.arange(k0, int(qpos[-1]) + 1)
            keys = cache.k[layer, :, k0:kpos[-1] + 1]  # [nkv, S, d]
            vals = cache.v[layer, :, k0:kpos[-1] + 1]
            scores = np.matmul(qg[:, :, q0:q1], keys[:, None].swapaxes(-1, -2)) * scale  # [nkv, group, t, S]
            scores = soft_cap(scores, c.attn_logit_softcapping)
            scores = np.where(sliding_window_mask(qpos, kpos, b.window), scores, np.float32(-np.inf))
            out[:, :, q0:q1] = np.matmul(_softmax(scores), vals[:, None])
        z = out.transpose(2, 0, 1, 3).reshape(T, nq * d)  # heads concatenated, before o_proj
        if taps is not None:
            taps["attn_z"] = z
        return b.dense(z)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _load_block(shards: ShardSet, cfg: CheckpointConfig, fmt: LinearFormat, i: int) -> Block:
    p = f"transformer.layers.{i}."

    def lin(name: str) -> Linear:
        f = LINEAR_FORMATS[None] if is_excluded(p + name, cfg) else fmt
        return f.load(shards, p + name)

    norms = {n: shards.get_f32(f"{p}{n}.weight") for n in NORMS}
    return Block(qkv=lin("attention.qkv"), dense=lin("attention.dense"), fc=lin("mlp.fc"), gate=lin("mlp.gate"),
                 proj=lin("mlp.proj"), norms=norms, window=cfg.sliding_window if cfg.is_sliding(i) else None,
                 kv_quant=kv_cache_quantizer(shards, i))


def _check_shapes(cfg: CheckpointConfig, embedding, blocks: list[Block], lm_head: Linear, where: Path) -> None:
    V, H, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    expect = [("transformer.vocab_embedding.weight", embedding.shape, (V, H)),
              ("lm_head.weight", lm_head.weight.shape, (V, H))]
    for i, b in enumerate(blocks):
        p = f"transformer.layers.{i}."
        expect += [(p + "attention.qkv.weight", b.qkv.weight.shape, (cfg.q_dim + 2 * cfg.kv_dim, H)),
                   (p + "attention.dense.weight", b.dense.weight.shape, (H, cfg.q_dim)),
                   (p + "mlp.fc.weight", b.fc.weight.shape, (F, H)), (p + "mlp.gate.weight", b.gate.weight.shape, (F, H)),
                   (p + "mlp.proj.weight", b.proj.weight.shape, (H, F))]
        expect += [(f"{p}{n}.weight", w.shape, (H,)) for n, w in b.norms.items()]
    for name, got, want in expect:
        if tuple(got) != want:
            raise InputError(f"{where}: tensor {name!r} has shape {list(got)} (TP-merged), expected {list(want)} "
                             "from config.json", fix="re-create the checkpoint with `trt-gemma convert`")
